"""From a distilled student to a deployed model: export, predict, profile.

- :func:`export_run`: a finished run's student as ONNX, TorchScript or a ``torch.export`` program,
  with its preprocessing in the file's metadata, a dynamic batch size, and a parity check against
  the PyTorch student on the run's test images before the file is kept (``deepkd export``);
- :func:`load_predictor` and :func:`predict`: class probabilities of image files from a run folder
  or an exported file, preprocessed as the run evaluates (``deepkd predict``);
- :func:`profile`: parameters, MACs and CPU latency of a teacher and a student (``deepkd profile``).

ONNX needs the ``deploy`` extra (``onnx``, ``onnxruntime``, ``onnxscript``): pip install -c
constraints.txt "deepkd[deploy]".
"""
from deepkd.deploy.export import export_run, format_report
from deepkd.deploy.predict import format_prediction, load_predictor, predict
from deepkd.deploy.profile import count_macs, format_profile, profile

__all__ = ["count_macs", "export_run", "format_prediction", "format_profile", "format_report", "load_predictor",
           "predict", "profile"]
