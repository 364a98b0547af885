"""Segmentation data: generated scenes, readers for the usual formats, one
sample layout, augmentation, voxelisation and batching."""

from .datasets import VALIDATION_SEED, CloudFiles, GeneratedScenes, VoxelDataset, open_source
from .generated import INDOOR_CLASSES, OUTDOOR_CLASSES, indoor_scene, lidar_rays, outdoor_scene
from .readers import (DEFAULT_IGNORE, LabelMap, find_clouds, load_label_map, read_cloud, read_las, read_numpy,
                      read_open3d, read_semantic3d, read_semantickitti, read_text)
from .sample import Sample
from .transforms import (NUM_FEATURES, Batch, VoxelSample, augment, check_voxel_extent, majority_labels,
                         point_features, voxelize_sample)

__all__ = [
    "DEFAULT_IGNORE", "INDOOR_CLASSES", "NUM_FEATURES", "OUTDOOR_CLASSES", "VALIDATION_SEED", "Batch", "CloudFiles",
    "GeneratedScenes", "LabelMap", "Sample", "VoxelDataset", "VoxelSample", "augment", "check_voxel_extent",
    "find_clouds", "indoor_scene", "lidar_rays", "load_label_map", "majority_labels", "open_source", "outdoor_scene",
    "point_features", "read_cloud", "read_las", "read_numpy", "read_open3d", "read_semantic3d", "read_semantickitti",
    "read_text", "voxelize_sample",
]
