"""From a distilled student to a deployed model: export, predict, profile.

- :func:`export_run`: a finished run's student as ONNX, TorchScript or a ``torch.export`` program,
  with its preprocessing in the file's metadata, a dynamic batch size, and a parity check against
  the PyTorch student on the run's test images before the file is kept (``deepkd export``);
- :func:`load_predictor` and :func:`predict`: class probabilities of image files from a run folder
  or an exported file, preprocessed as the run evaluates (``deepkd predict``);
- :func:`quantize_run`: int8 ONNX of a run's student, with top-1 before and after and the latency
  ratio (``deepkd quantize``);
- :func:`profile`: parameters, MACs and CPU latency of a teacher and a student (``deepkd profile``).

ONNX needs the ``deploy`` extra (``onnx``, ``onnxruntime``, ``onnxscript``): pip install -c
constraints.txt "deepkd[deploy]".
"""
from deepkd.deploy.export import export_run, format_report
from deepkd.deploy.predict import format_prediction, load_predictor, predict
from deepkd.deploy.profile import count_macs, format_profile, profile
from deepkd.deploy.quantize import format_quantize, quantize_run

__all__ = ["count_macs", "export_run", "format_prediction", "format_profile", "format_quantize", "format_report",
           "load_predictor", "predict", "profile", "quantize_run"]
