"""Data: the embedded shapes scenes, image folders, multi-crop augmentation, resumable loading."""

from .augment import MultiCropDataset, crop_view, gaussian_blur, photometric
from .folder import IMAGE_EXTENSIONS, ImageFolderDataset
from .loader import StepBatchSampler, build_base_dataset, build_loader
from .shapes import CLASSES, ShapesDataset, render_scene

__all__ = [
    "CLASSES",
    "IMAGE_EXTENSIONS",
    "ImageFolderDataset",
    "MultiCropDataset",
    "ShapesDataset",
    "StepBatchSampler",
    "build_base_dataset",
    "build_loader",
    "crop_view",
    "gaussian_blur",
    "photometric",
    "render_scene",
]
