"""Object detection distillation: KD, DKD and DeepKD on the RoI classifier of Faster R-CNN.

The student's sampled RoIs (:func:`roi_forward`) are scored by the frozen teacher
(:func:`teacher_roi_logits`); any registered logit method is applied to the two ``[N, C]`` logit
matrices and its ``ce`` replaces torchvision's ``loss_classifier`` (:func:`detection_terms`); the
step (:func:`detection_train_step`) hands the named terms to the shared optimisation tail. Data and
evaluation use pycocotools; :func:`write_synthetic_coco` and :func:`tiny_fasterrcnn` make an
offline demo (:func:`run_detection_demo`). A feature method (``reviewkd`` with ``fpn: true``,
``dkd+reviewkd``) also reads both backbones' FPN levels (:func:`teacher_forward`,
:func:`pyramid_features`; its connectors' shapes from :func:`pyramid_info`).
"""
from deepkd.detection.coco import (
    CocoDetection,
    DetectionLoader,
    aspect_ratio_batches,
    coco_target,
    collate,
    hflip,
    load_coco,
)
from deepkd.detection.demo import run_detection_demo
from deepkd.detection.download import ARCHIVES, coco_paths, prepare_coco
from deepkd.detection.evaluate import METRICS, coco_evaluate, coco_summary, detections_to_coco
from deepkd.detection.models import DETECTORS, create_detector, list_detectors, tiny_fasterrcnn
from deepkd.detection.roi import (
    RoIOutputs,
    TeacherOutputs,
    check_detector,
    check_pair,
    class_count,
    prepare_teacher,
    pyramid_info,
    roi_forward,
    teacher_forward,
    teacher_roi_logits,
)
from deepkd.detection.step import detection_terms, detection_train_step, optimizer_params, pyramid_features
from deepkd.detection.synthetic import NUM_CLASSES as SYNTHETIC_NUM_CLASSES
from deepkd.detection.synthetic import write_synthetic_coco
from deepkd.detection.task import DetectionTask, train_detector
from deepkd.optim import warmup_multistep_lr

__all__ = ["ARCHIVES", "DETECTORS", "METRICS", "SYNTHETIC_NUM_CLASSES", "CocoDetection", "DetectionLoader",
           "DetectionTask", "RoIOutputs", "TeacherOutputs", "aspect_ratio_batches", "check_detector", "check_pair",
           "coco_evaluate", "coco_paths", "coco_summary", "coco_target", "collate", "create_detector",
           "detection_terms", "detection_train_step", "detections_to_coco", "hflip", "list_detectors", "load_coco",
           "class_count", "optimizer_params", "prepare_coco", "prepare_teacher", "pyramid_features", "pyramid_info",
           "roi_forward", "run_detection_demo", "teacher_forward", "teacher_roi_logits", "tiny_fasterrcnn",
           "train_detector", "warmup_multistep_lr", "write_synthetic_coco"]
