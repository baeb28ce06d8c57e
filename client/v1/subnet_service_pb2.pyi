from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WeightsFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WEIGHTS_FORMAT_UNSPECIFIED: _ClassVar[WeightsFormat]
    WEIGHTS_FORMAT_SAFETENSORS: _ClassVar[WeightsFormat]
    WEIGHTS_FORMAT_ONNX: _ClassVar[WeightsFormat]
    WEIGHTS_FORMAT_TORCHSCRIPT: _ClassVar[WeightsFormat]
    WEIGHTS_FORMAT_ONNX_INT8: _ClassVar[WeightsFormat]
    WEIGHTS_FORMAT_OPENVINO_INT8: _ClassVar[WeightsFormat]
WEIGHTS_FORMAT_UNSPECIFIED: WeightsFormat
WEIGHTS_FORMAT_SAFETENSORS: WeightsFormat
WEIGHTS_FORMAT_ONNX: WeightsFormat
WEIGHTS_FORMAT_TORCHSCRIPT: WeightsFormat
WEIGHTS_FORMAT_ONNX_INT8: WeightsFormat
WEIGHTS_FORMAT_OPENVINO_INT8: WeightsFormat

class Arch(_message.Message):
    __slots__ = ("kernel", "expand", "depth", "resolution")
    KERNEL_FIELD_NUMBER: _ClassVar[int]
    EXPAND_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    kernel: _containers.RepeatedScalarFieldContainer[int]
    expand: _containers.RepeatedScalarFieldContainer[int]
    depth: _containers.RepeatedScalarFieldContainer[int]
    resolution: int
    def __init__(self, kernel: _Optional[_Iterable[int]] = ..., expand: _Optional[_Iterable[int]] = ..., depth: _Optional[_Iterable[int]] = ..., resolution: _Optional[int] = ...) -> None: ...

class Stage(_message.Message):
    __slots__ = ("width", "stride", "activation", "squeeze_excite")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    SQUEEZE_EXCITE_FIELD_NUMBER: _ClassVar[int]
    width: int
    stride: int
    activation: str
    squeeze_excite: bool
    def __init__(self, width: _Optional[int] = ..., stride: _Optional[int] = ..., activation: _Optional[str] = ..., squeeze_excite: _Optional[bool] = ...) -> None: ...

class SearchSpace(_message.Message):
    __slots__ = ("name", "kernel_choices", "expand_choices", "depth_choices", "resolutions", "stages", "in_channels", "num_classes", "definition_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KERNEL_CHOICES_FIELD_NUMBER: _ClassVar[int]
    EXPAND_CHOICES_FIELD_NUMBER: _ClassVar[int]
    DEPTH_CHOICES_FIELD_NUMBER: _ClassVar[int]
    RESOLUTIONS_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    IN_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    DEFINITION_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    kernel_choices: _containers.RepeatedScalarFieldContainer[int]
    expand_choices: _containers.RepeatedScalarFieldContainer[int]
    depth_choices: _containers.RepeatedScalarFieldContainer[int]
    resolutions: _containers.RepeatedScalarFieldContainer[int]
    stages: _containers.RepeatedCompositeFieldContainer[Stage]
    in_channels: int
    num_classes: int
    definition_json: str
    def __init__(self, name: _Optional[str] = ..., kernel_choices: _Optional[_Iterable[int]] = ..., expand_choices: _Optional[_Iterable[int]] = ..., depth_choices: _Optional[_Iterable[int]] = ..., resolutions: _Optional[_Iterable[int]] = ..., stages: _Optional[_Iterable[_Union[Stage, _Mapping]]] = ..., in_channels: _Optional[int] = ..., num_classes: _Optional[int] = ..., definition_json: _Optional[str] = ...) -> None: ...

class DataDescription(_message.Message):
    __slots__ = ("dataset", "channels", "image_size", "num_classes", "mean", "std", "class_names")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    channels: int
    image_size: int
    num_classes: int
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    class_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, dataset: _Optional[str] = ..., channels: _Optional[int] = ..., image_size: _Optional[int] = ..., num_classes: _Optional[int] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., class_names: _Optional[_Iterable[str]] = ...) -> None: ...

class PredictorQuality(_message.Message):
    __slots__ = ("family", "train_samples", "test_samples", "kendall_tau", "rmse", "kendall_tau_ceiling", "interval_level", "interval_coverage", "interval_half_width", "test_shift")
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TEST_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    KENDALL_TAU_FIELD_NUMBER: _ClassVar[int]
    RMSE_FIELD_NUMBER: _ClassVar[int]
    KENDALL_TAU_CEILING_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_LEVEL_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_COVERAGE_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_HALF_WIDTH_FIELD_NUMBER: _ClassVar[int]
    TEST_SHIFT_FIELD_NUMBER: _ClassVar[int]
    family: str
    train_samples: int
    test_samples: int
    kendall_tau: float
    rmse: float
    kendall_tau_ceiling: float
    interval_level: float
    interval_coverage: float
    interval_half_width: float
    test_shift: float
    def __init__(self, family: _Optional[str] = ..., train_samples: _Optional[int] = ..., test_samples: _Optional[int] = ..., kendall_tau: _Optional[float] = ..., rmse: _Optional[float] = ..., kendall_tau_ceiling: _Optional[float] = ..., interval_level: _Optional[float] = ..., interval_coverage: _Optional[float] = ..., interval_half_width: _Optional[float] = ..., test_shift: _Optional[float] = ...) -> None: ...

class Supernet(_message.Message):
    __slots__ = ("name", "digest", "space", "data", "accuracy_predictor", "targets")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SPACE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_PREDICTOR_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    name: str
    digest: str
    space: SearchSpace
    data: DataDescription
    accuracy_predictor: PredictorQuality
    targets: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., digest: _Optional[str] = ..., space: _Optional[_Union[SearchSpace, _Mapping]] = ..., data: _Optional[_Union[DataDescription, _Mapping]] = ..., accuracy_predictor: _Optional[_Union[PredictorQuality, _Mapping]] = ..., targets: _Optional[_Iterable[str]] = ...) -> None: ...

class ListSupernetsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSupernetsResponse(_message.Message):
    __slots__ = ("supernets", "api_version")
    SUPERNETS_FIELD_NUMBER: _ClassVar[int]
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    supernets: _containers.RepeatedCompositeFieldContainer[Supernet]
    api_version: str
    def __init__(self, supernets: _Optional[_Iterable[_Union[Supernet, _Mapping]]] = ..., api_version: _Optional[str] = ...) -> None: ...

class ReferenceSubnet(_message.Message):
    __slots__ = ("subnet_id", "arch", "profiled_ms")
    SUBNET_ID_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    PROFILED_MS_FIELD_NUMBER: _ClassVar[int]
    subnet_id: str
    arch: Arch
    profiled_ms: float
    def __init__(self, subnet_id: _Optional[str] = ..., arch: _Optional[_Union[Arch, _Mapping]] = ..., profiled_ms: _Optional[float] = ...) -> None: ...

class ReferenceTiming(_message.Message):
    __slots__ = ("subnet_id", "ms", "pass_index")
    SUBNET_ID_FIELD_NUMBER: _ClassVar[int]
    MS_FIELD_NUMBER: _ClassVar[int]
    PASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    subnet_id: str
    ms: float
    pass_index: int
    def __init__(self, subnet_id: _Optional[str] = ..., ms: _Optional[float] = ..., pass_index: _Optional[int] = ...) -> None: ...

class Target(_message.Message):
    __slots__ = ("name", "supernet", "cpu", "threads", "backend", "backend_version", "batch", "blocks", "mean_abs_rel_error", "source", "references", "held_out_within_10pct", "held_out_spearman", "model_family", "speed", "speed_offset_ms", "noisy", "noise", "precision", "weights_format", "speed_spread", "speed_passes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SUPERNET_FIELD_NUMBER: _ClassVar[int]
    CPU_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    BACKEND_VERSION_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    MEAN_ABS_REL_ERROR_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    REFERENCES_FIELD_NUMBER: _ClassVar[int]
    HELD_OUT_WITHIN_10PCT_FIELD_NUMBER: _ClassVar[int]
    HELD_OUT_SPEARMAN_FIELD_NUMBER: _ClassVar[int]
    MODEL_FAMILY_FIELD_NUMBER: _ClassVar[int]
    SPEED_FIELD_NUMBER: _ClassVar[int]
    SPEED_OFFSET_MS_FIELD_NUMBER: _ClassVar[int]
    NOISY_FIELD_NUMBER: _ClassVar[int]
    NOISE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FORMAT_FIELD_NUMBER: _ClassVar[int]
    SPEED_SPREAD_FIELD_NUMBER: _ClassVar[int]
    SPEED_PASSES_FIELD_NUMBER: _ClassVar[int]
    name: str
    supernet: str
    cpu: str
    threads: int
    backend: str
    backend_version: str
    batch: int
    blocks: int
    mean_abs_rel_error: float
    source: str
    references: _containers.RepeatedCompositeFieldContainer[ReferenceSubnet]
    held_out_within_10pct: float
    held_out_spearman: float
    model_family: str
    speed: float
    speed_offset_ms: float
    noisy: bool
    noise: str
    precision: str
    weights_format: WeightsFormat
    speed_spread: float
    speed_passes: int
    def __init__(self, name: _Optional[str] = ..., supernet: _Optional[str] = ..., cpu: _Optional[str] = ..., threads: _Optional[int] = ..., backend: _Optional[str] = ..., backend_version: _Optional[str] = ..., batch: _Optional[int] = ..., blocks: _Optional[int] = ..., mean_abs_rel_error: _Optional[float] = ..., source: _Optional[str] = ..., references: _Optional[_Iterable[_Union[ReferenceSubnet, _Mapping]]] = ..., held_out_within_10pct: _Optional[float] = ..., held_out_spearman: _Optional[float] = ..., model_family: _Optional[str] = ..., speed: _Optional[float] = ..., speed_offset_ms: _Optional[float] = ..., noisy: _Optional[bool] = ..., noise: _Optional[str] = ..., precision: _Optional[str] = ..., weights_format: _Optional[_Union[WeightsFormat, str]] = ..., speed_spread: _Optional[float] = ..., speed_passes: _Optional[int] = ...) -> None: ...

class ListTargetsRequest(_message.Message):
    __slots__ = ("supernet",)
    SUPERNET_FIELD_NUMBER: _ClassVar[int]
    supernet: str
    def __init__(self, supernet: _Optional[str] = ...) -> None: ...

class ListTargetsResponse(_message.Message):
    __slots__ = ("targets",)
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    targets: _containers.RepeatedCompositeFieldContainer[Target]
    def __init__(self, targets: _Optional[_Iterable[_Union[Target, _Mapping]]] = ...) -> None: ...

class RegisterTargetRequest(_message.Message):
    __slots__ = ("supernet", "table_json", "replace")
    SUPERNET_FIELD_NUMBER: _ClassVar[int]
    TABLE_JSON_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    supernet: str
    table_json: str
    replace: bool
    def __init__(self, supernet: _Optional[str] = ..., table_json: _Optional[str] = ..., replace: _Optional[bool] = ...) -> None: ...

class DeleteTargetRequest(_message.Message):
    __slots__ = ("supernet", "target")
    SUPERNET_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    supernet: str
    target: str
    def __init__(self, supernet: _Optional[str] = ..., target: _Optional[str] = ...) -> None: ...

class DeleteTargetResponse(_message.Message):
    __slots__ = ("target",)
    TARGET_FIELD_NUMBER: _ClassVar[int]
    target: str
    def __init__(self, target: _Optional[str] = ...) -> None: ...

class Constraints(_message.Message):
    __slots__ = ("max_latency_ms", "max_macs", "max_params", "resolutions", "min_accuracy")
    MAX_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_MACS_FIELD_NUMBER: _ClassVar[int]
    MAX_PARAMS_FIELD_NUMBER: _ClassVar[int]
    RESOLUTIONS_FIELD_NUMBER: _ClassVar[int]
    MIN_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    max_latency_ms: float
    max_macs: int
    max_params: int
    resolutions: _containers.RepeatedScalarFieldContainer[int]
    min_accuracy: float
    def __init__(self, max_latency_ms: _Optional[float] = ..., max_macs: _Optional[int] = ..., max_params: _Optional[int] = ..., resolutions: _Optional[_Iterable[int]] = ..., min_accuracy: _Optional[float] = ...) -> None: ...

class SearchOptions(_message.Message):
    __slots__ = ("population", "generations")
    POPULATION_FIELD_NUMBER: _ClassVar[int]
    GENERATIONS_FIELD_NUMBER: _ClassVar[int]
    population: int
    generations: int
    def __init__(self, population: _Optional[int] = ..., generations: _Optional[int] = ...) -> None: ...

class SearchSubnetRequest(_message.Message):
    __slots__ = ("supernet", "target", "constraints", "seed", "options", "reference_timings")
    SUPERNET_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINTS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_TIMINGS_FIELD_NUMBER: _ClassVar[int]
    supernet: str
    target: str
    constraints: Constraints
    seed: int
    options: SearchOptions
    reference_timings: _containers.RepeatedCompositeFieldContainer[ReferenceTiming]
    def __init__(self, supernet: _Optional[str] = ..., target: _Optional[str] = ..., constraints: _Optional[_Union[Constraints, _Mapping]] = ..., seed: _Optional[int] = ..., options: _Optional[_Union[SearchOptions, _Mapping]] = ..., reference_timings: _Optional[_Iterable[_Union[ReferenceTiming, _Mapping]]] = ...) -> None: ...

class Subnet(_message.Message):
    __slots__ = ("id", "arch", "predicted_accuracy", "predicted_latency_ms", "macs", "params", "search_seconds", "supernet", "target", "speed", "speed_offset_ms", "fine_tuned", "predicted_accuracy_interval", "extrapolated", "measured_accuracy", "latency_noisy", "supernet_digest", "speed_spread", "speed_passes")
    ID_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    MACS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    SEARCH_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SUPERNET_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    SPEED_FIELD_NUMBER: _ClassVar[int]
    SPEED_OFFSET_MS_FIELD_NUMBER: _ClassVar[int]
    FINE_TUNED_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_ACCURACY_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    EXTRAPOLATED_FIELD_NUMBER: _ClassVar[int]
    MEASURED_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    LATENCY_NOISY_FIELD_NUMBER: _ClassVar[int]
    SUPERNET_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SPEED_SPREAD_FIELD_NUMBER: _ClassVar[int]
    SPEED_PASSES_FIELD_NUMBER: _ClassVar[int]
    id: str
    arch: Arch
    predicted_accuracy: float
    predicted_latency_ms: float
    macs: int
    params: int
    search_seconds: float
    supernet: str
    target: str
    speed: float
    speed_offset_ms: float
    fine_tuned: bool
    predicted_accuracy_interval: AccuracyInterval
    extrapolated: bool
    measured_accuracy: MeasuredAccuracy
    latency_noisy: bool
    supernet_digest: str
    speed_spread: float
    speed_passes: int
    def __init__(self, id: _Optional[str] = ..., arch: _Optional[_Union[Arch, _Mapping]] = ..., predicted_accuracy: _Optional[float] = ..., predicted_latency_ms: _Optional[float] = ..., macs: _Optional[int] = ..., params: _Optional[int] = ..., search_seconds: _Optional[float] = ..., supernet: _Optional[str] = ..., target: _Optional[str] = ..., speed: _Optional[float] = ..., speed_offset_ms: _Optional[float] = ..., fine_tuned: _Optional[bool] = ..., predicted_accuracy_interval: _Optional[_Union[AccuracyInterval, _Mapping]] = ..., extrapolated: _Optional[bool] = ..., measured_accuracy: _Optional[_Union[MeasuredAccuracy, _Mapping]] = ..., latency_noisy: _Optional[bool] = ..., supernet_digest: _Optional[str] = ..., speed_spread: _Optional[float] = ..., speed_passes: _Optional[int] = ...) -> None: ...

class AccuracyInterval(_message.Message):
    __slots__ = ("low", "high", "level", "measured_distance")
    LOW_FIELD_NUMBER: _ClassVar[int]
    HIGH_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    MEASURED_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    low: float
    high: float
    level: float
    measured_distance: float
    def __init__(self, low: _Optional[float] = ..., high: _Optional[float] = ..., level: _Optional[float] = ..., measured_distance: _Optional[float] = ...) -> None: ...

class MeasuredAccuracy(_message.Message):
    __slots__ = ("accuracy", "split", "images")
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    accuracy: float
    split: str
    images: int
    def __init__(self, accuracy: _Optional[float] = ..., split: _Optional[str] = ..., images: _Optional[int] = ...) -> None: ...

class GetParetoFrontRequest(_message.Message):
    __slots__ = ("supernet", "target", "points", "constraints", "seed", "options", "reference_timings")
    SUPERNET_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINTS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_TIMINGS_FIELD_NUMBER: _ClassVar[int]
    supernet: str
    target: str
    points: int
    constraints: Constraints
    seed: int
    options: SearchOptions
    reference_timings: _containers.RepeatedCompositeFieldContainer[ReferenceTiming]
    def __init__(self, supernet: _Optional[str] = ..., target: _Optional[str] = ..., points: _Optional[int] = ..., constraints: _Optional[_Union[Constraints, _Mapping]] = ..., seed: _Optional[int] = ..., options: _Optional[_Union[SearchOptions, _Mapping]] = ..., reference_timings: _Optional[_Iterable[_Union[ReferenceTiming, _Mapping]]] = ...) -> None: ...

class ParetoFront(_message.Message):
    __slots__ = ("points", "search_seconds")
    POINTS_FIELD_NUMBER: _ClassVar[int]
    SEARCH_SECONDS_FIELD_NUMBER: _ClassVar[int]
    points: _containers.RepeatedCompositeFieldContainer[Subnet]
    search_seconds: float
    def __init__(self, points: _Optional[_Iterable[_Union[Subnet, _Mapping]]] = ..., search_seconds: _Optional[float] = ...) -> None: ...

class GetSubnetWeightsRequest(_message.Message):
    __slots__ = ("supernet", "subnet_id", "arch", "format")
    SUPERNET_FIELD_NUMBER: _ClassVar[int]
    SUBNET_ID_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    supernet: str
    subnet_id: str
    arch: Arch
    format: WeightsFormat
    def __init__(self, supernet: _Optional[str] = ..., subnet_id: _Optional[str] = ..., arch: _Optional[_Union[Arch, _Mapping]] = ..., format: _Optional[_Union[WeightsFormat, str]] = ...) -> None: ...

class WeightsHeader(_message.Message):
    __slots__ = ("format", "total_bytes", "sha256", "subnet_id", "arch", "input_shape", "mean", "std", "supernet_digest", "calibration_images", "fine_tuned")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SUBNET_ID_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    SUPERNET_DIGEST_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_IMAGES_FIELD_NUMBER: _ClassVar[int]
    FINE_TUNED_FIELD_NUMBER: _ClassVar[int]
    format: WeightsFormat
    total_bytes: int
    sha256: str
    subnet_id: str
    arch: Arch
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    supernet_digest: str
    calibration_images: int
    fine_tuned: bool
    def __init__(self, format: _Optional[_Union[WeightsFormat, str]] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., subnet_id: _Optional[str] = ..., arch: _Optional[_Union[Arch, _Mapping]] = ..., input_shape: _Optional[_Iterable[int]] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., supernet_digest: _Optional[str] = ..., calibration_images: _Optional[int] = ..., fine_tuned: _Optional[bool] = ...) -> None: ...

class GetSubnetWeightsResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: WeightsHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[WeightsHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class GetProfileKitRequest(_message.Message):
    __slots__ = ("supernet", "precision", "runtime")
    SUPERNET_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    supernet: str
    precision: str
    runtime: str
    def __init__(self, supernet: _Optional[str] = ..., precision: _Optional[str] = ..., runtime: _Optional[str] = ...) -> None: ...

class ProfileKitHeader(_message.Message):
    __slots__ = ("manifest_json", "total_bytes", "sha256", "supernet_digest")
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SUPERNET_DIGEST_FIELD_NUMBER: _ClassVar[int]
    manifest_json: str
    total_bytes: int
    sha256: str
    supernet_digest: str
    def __init__(self, manifest_json: _Optional[str] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., supernet_digest: _Optional[str] = ...) -> None: ...

class GetProfileKitResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ProfileKitHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[ProfileKitHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...
