from .preflight import (ConfigCheckError, backbone_out_channels, check_backbone_channels,
                        check_coco_file, check_config, check_dataset, describe_data_error)

__all__ = [
    'ConfigCheckError', 'backbone_out_channels', 'check_backbone_channels', 'check_coco_file',
    'check_config', 'check_dataset', 'describe_data_error'
]
