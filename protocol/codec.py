"""Wire codec: message <-> list of ZeroMQ frames, never pickle.

Layout of one message::

    frame 0      kind byte (protocol.messages.Kind)
    frame 1      msgpack header {"v": version, "f": {scalar fields}, "t": [[name, dtype, shape, n_frames], ...]}
    frame 2..    raw tensor bytes, tensor after tensor, each split into frames of at most ``chunk_bytes``

Large tensors are split because single 64 MiB frames move 2-3x slower through pyzmq on these
machines than 1-4 MiB frames. Encoding is zero-copy (frames are views of the tensors' storage).
Decoding copies each tensor once, into a fresh tensor or into storage the caller provides, or,
with ``copy=False``, not at all: a large tensor stays in the frames it arrived in, as a view of its
one frame or as a ``FramedTensor`` over several. Only frames with a buffer of their own are
viewed, so the views pin exactly the tensor's bytes. The trainer keeps received samples
that way until ``pack`` copies them into a batch, the one copy they ever get: on a 2-core machine
the kernel's two socket copies already fill both cores, and a third copy on receive cost about a
third of the throughput (bench/transport).

Everything a peer sends is validated before any allocation: kind, header types, dtype whitelist,
shapes, frame count, frame sizes, and the message size limit. All of it fails as ProtocolError, and
nothing else does, whatever the header claims: scalar fields must fit int64, floats be finite, text
and lists be of bounded length, every tensor dim below 2**31. ``read_header`` does the header half
of that on its own, so ``sockets.recv_bounded`` can refuse a message before its data frames are read.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import reprlib
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
import numpy as np
import torch

from protocol.messages import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    TENSOR,
    Message,
    ProtocolError,
    ProtocolVersionError,
    schema,
)

DEFAULT_CHUNK_BYTES = 2 << 20
MIN_CHUNK_BYTES = 4 << 10
MAX_CHUNK_BYTES = 64 << 20
DEFAULT_MAX_MESSAGE_BYTES = 1 << 30
MAX_HEADER_BYTES = 1 << 20
MAX_TENSOR_DIMS = 8
# Every dim is below this, and the product of the dims (zero dims counted as one) is at most
# MAX_TENSOR_ELEMENTS, so no stride or size computation can overflow int64 even for empty tensors.
MAX_TENSOR_DIM = (1 << 31) - 1
MAX_TENSOR_ELEMENTS = 1 << 40
# Header fields: ints fit int64, text and collections are bounded (the header itself is at most
# MAX_HEADER_BYTES; these bound what one field may hold).
MIN_INT, MAX_INT = -(1 << 63), (1 << 63) - 1
MAX_TEXT_CHARS = 64 << 10
MAX_ITEMS = 1 << 16

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

# Tensors smaller than this are copied even with copy=False: copying them costs no more than
# viewing them.
VIEW_MIN_BYTES = 16 << 10
# ZeroMQ receives messages smaller than its 8 KiB input batch (ZMQ_IN_BATCH_SIZE) into one shared
# buffer; a view of such a frame would pin the whole buffer, so those frames are always copied.
SHARED_BATCH_BYTES = 8 << 10

# alloc(name, dtype, shape) -> contiguous CPU tensor to decode into
Allocator = Callable[[str, torch.dtype, tuple[int, ...]], torch.Tensor]


class FramedTensor:
    """A received tensor left in the frames it arrived in, uncopied (``decode(..., copy=False)``).

    ``parts`` are 1-D tensors viewing the frames, in order; their concatenation, reshaped to
    ``shape``, is the tensor. It answers the metadata questions a tensor does (``shape``, ``dtype``,
    ``dim()``, ``numel()``, ``element_size()``, ``nbytes``); its data is reached by copying it out,
    all at once with ``contiguous()`` or its leading rows into a slice of a batch with ``copy_to``.
    """

    __slots__ = ("parts", "shape", "dtype")
    device = torch.device("cpu")

    def __init__(self, parts: Sequence[torch.Tensor], shape: Sequence[int]):
        self.parts = tuple(parts)
        self.shape = torch.Size(shape)
        if not self.parts:
            raise ValueError("a FramedTensor needs at least one part")
        self.dtype = self.parts[0].dtype
        if any(p.dim() != 1 or p.dtype != self.dtype for p in self.parts):
            raise ValueError("FramedTensor parts must be 1-D tensors of one dtype")
        if sum(p.numel() for p in self.parts) != math.prod(self.shape):
            raise ValueError(
                f"parts hold {sum(p.numel() for p in self.parts)} elements, shape {tuple(self.shape)} needs {math.prod(self.shape)}"
            )

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return self.parts[0].element_size()

    @property
    def nbytes(self) -> int:
        return self.numel() * self.element_size()

    def contiguous(self) -> torch.Tensor:
        """The whole tensor, copied once into fresh storage."""
        return torch.cat(self.parts).view(self.shape)

    def copy_to(self, out: torch.Tensor) -> torch.Tensor:
        """Copy the first ``len(out)`` rows (leading-dim entries) into ``out`` and return it."""
        if out.shape[1:] != self.shape[1:] or out.shape[0] > self.shape[0] or out.dtype != self.dtype:
            raise ValueError(f"cannot copy {self.dtype} {tuple(self.shape)} into {out.dtype} {tuple(out.shape)}")
        flat = out.view(-1)  # out must be contiguous: a slice of rows of a contiguous batch is
        offset = 0
        for part in self.parts:
            n = min(part.numel(), flat.numel() - offset)
            if n <= 0:
                break
            flat[offset : offset + n].copy_(part[:n])
            offset += n
        return out

    def __repr__(self) -> str:
        return f"FramedTensor({self.dtype}, shape={tuple(self.shape)}, parts={len(self.parts)})"


def all_finite(tensor: torch.Tensor | FramedTensor) -> bool:
    """True if a floating tensor holds no NaN or Inf (always true for integer tensors).

    One read pass per part: min and max propagate NaN and show +-Inf, where ``isfinite(t).all()``
    would also write a bool per element (12x slower on a 32 MiB bf16 sample).
    """
    parts = tensor.parts if isinstance(tensor, FramedTensor) else (tensor,)
    for part in parts:
        if part.numel() == 0 or not part.dtype.is_floating_point:
            continue
        low, high = torch.aminmax(part)
        if not (math.isfinite(low.item()) and math.isfinite(high.item())):
            return False
    return True


def check_chunk_bytes(chunk_bytes: int) -> int:
    if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_bytes must be in [{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}], got {chunk_bytes}")
    return chunk_bytes


# ---- encode ---------------------------------------------------------------------------------


def _check_value(cls_name: str, name: str, spec: object, value: object) -> None:
    """Encoder-side type check: refuse anything the decoder would refuse."""
    if not _matches(spec, value):
        raise TypeError(
            f"{cls_name}.{name}: {_short(value)} does not fit field type {spec!r} (ints fit int64, floats are "
            f"finite, text has at most {MAX_TEXT_CHARS} chars, lists and maps at most {MAX_ITEMS} entries)"
        )


def _tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    """Flat uint8 numpy view of a contiguous CPU tensor (a copy only if it was not contiguous)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def encode(message: Message, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[Any]:
    """Frames for ``message``: bytes for kind and header, numpy uint8 views for tensor data."""
    cls = type(message)
    if MESSAGE_TYPES.get(int(getattr(cls, "KIND", -1))) is not cls:
        raise TypeError(f"cannot encode {cls.__name__}: not a registered protocol message")
    check_chunk_bytes(chunk_bytes)
    message.check()
    fields: dict[str, Any] = {}
    descriptors: list[list[Any]] = []
    data_frames: list[Any] = []
    for name, spec in schema(cls).items():
        value = getattr(message, name)
        if spec is not TENSOR:
            _check_value(cls.__name__, name, spec, value)
            fields[name] = value
            continue
        if isinstance(value, FramedTensor):
            value = value.contiguous()
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{cls.__name__}.{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dtype not in DTYPE_NAMES:
            raise TypeError(f"{cls.__name__}.{name}: dtype {value.dtype} is not one the protocol carries")
        if value.device.type != "cpu":
            raise TypeError(f"{cls.__name__}.{name} is on {value.device}; copy it to host memory first")
        if value.dim() > MAX_TENSOR_DIMS:
            raise TypeError(f"{cls.__name__}.{name} has {value.dim()} dims, at most {MAX_TENSOR_DIMS}")
        flat = _tensor_bytes(value)
        chunks = [flat[i : i + chunk_bytes] for i in range(0, flat.nbytes, chunk_bytes)]
        descriptors.append([name, DTYPE_NAMES[value.dtype], list(value.shape), len(chunks)])
        data_frames.extend(chunks)
    header = msgpack.packb({"v": PROTOCOL_VERSION, "f": fields, "t": descriptors}, use_bin_type=True)
    return [bytes((int(cls.KIND),)), header, *data_frames]


# ---- decode ---------------------------------------------------------------------------------


_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 80
_repr.maxlevel = 3


def _short(value: object) -> str:
    """A bounded repr of a peer-supplied value for error messages (cheap at any size or depth)."""
    return _repr.repr(value)


def _matches(spec: object, value: object) -> bool:
    if spec is int:
        return isinstance(value, int) and not isinstance(value, bool) and MIN_INT <= value <= MAX_INT
    if spec is float:
        return _matches(int, value) or (isinstance(value, float) and math.isfinite(value))
    if spec is str:
        return isinstance(value, str) and len(value) <= MAX_TEXT_CHARS
    if spec is bool:
        return isinstance(value, bool)
    if isinstance(spec, tuple) and spec[0] is list:
        return isinstance(value, list) and len(value) <= MAX_ITEMS and all(_matches(spec[1], v) for v in value)
    if isinstance(spec, tuple) and spec[0] is dict:
        return (
            isinstance(value, dict)
            and len(value) <= MAX_ITEMS
            and all(_matches(spec[1], k) and _matches(spec[2], v) for k, v in value.items())
        )
    raise AssertionError(f"unknown field spec {spec!r}")


def _frame_parts(buffers: Sequence[memoryview], dtype: torch.dtype) -> list[torch.Tensor] | None:
    """1-D ``dtype`` tensors over ``buffers``: views where a frame is writable, aligned and has a
    buffer of its own, copies of the rest (a small last frame, say). None if no frame can be
    viewed or a frame splits an element: then the whole tensor is copied."""
    itemsize = dtype.itemsize
    if any(len(b) % itemsize for b in buffers):
        return None
    viewable = [
        len(b) >= SHARED_BATCH_BYTES
        and not b.readonly
        and ctypes.addressof(ctypes.c_char.from_buffer(b)) % itemsize == 0
        for b in buffers
    ]
    if not any(viewable):
        return None
    parts = []
    for buffer, view in zip(buffers, viewable):
        if view:
            parts.append(torch.frombuffer(buffer, dtype=dtype))
        else:
            part = torch.empty(len(buffer) // itemsize, dtype=dtype)
            part.view(torch.uint8).numpy()[:] = np.frombuffer(buffer, dtype=np.uint8)
            parts.append(part)
    return parts


def _buffer(frame: Any) -> memoryview:
    buffer = getattr(frame, "buffer", None)  # zmq.Frame
    try:
        return memoryview(buffer if buffer is not None else frame).cast("B")
    except TypeError as e:
        raise ProtocolError(f"frame of type {type(frame).__name__} is not a byte buffer") from e


def _parse_descriptor(raw: object, tensor_fields: set[str]) -> tuple[str, torch.dtype, tuple[int, ...], int]:
    if not (isinstance(raw, list) and len(raw) == 4):
        raise ProtocolError(f"tensor descriptor must be [name, dtype, shape, n_frames], got {_short(raw)}")
    name, dtype_name, shape, n_frames = raw
    if not isinstance(name, str) or name not in tensor_fields:
        raise ProtocolError(f"unexpected tensor {_short(name)}")
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise ProtocolError(f"tensor {name}: dtype {_short(dtype_name)} is not one the protocol carries")
    if not (
        isinstance(shape, list)
        and len(shape) <= MAX_TENSOR_DIMS
        and all(_matches(int, d) and 0 <= d <= MAX_TENSOR_DIM for d in shape)
    ):
        raise ProtocolError(
            f"tensor {name}: bad shape {_short(shape)} (at most {MAX_TENSOR_DIMS} dims, each in [0, {MAX_TENSOR_DIM}])"
        )
    if math.prod(max(d, 1) for d in shape) > MAX_TENSOR_ELEMENTS:
        raise ProtocolError(f"tensor {name}: shape {shape} exceeds {MAX_TENSOR_ELEMENTS} elements")
    dtype = DTYPES[dtype_name]
    nbytes = math.prod(shape) * dtype.itemsize
    # The encoder's frames hold at least MIN_CHUNK_BYTES each but the last, and none is empty.
    most_frames = -(-nbytes // MIN_CHUNK_BYTES)
    if not (_matches(int, n_frames) and (n_frames > 0) == (nbytes > 0) and 0 <= n_frames <= most_frames):
        raise ProtocolError(
            f"tensor {name}: bad frame count {_short(n_frames)} for {nbytes} bytes (at most {most_frames})"
        )
    return name, dtype, tuple(shape), n_frames


@dataclasses.dataclass(frozen=True)
class Header:
    """A validated header: the message class, its scalar fields, and each tensor's
    ``(name, dtype, shape, n_frames)`` with its byte size."""

    cls: type[Message]
    fields: dict[str, Any]
    tensors: list[tuple[str, torch.dtype, tuple[int, ...], int]]
    sizes: list[int]

    @property
    def num_frames(self) -> int:
        """Data frames the header announces (after the kind and header frames)."""
        return sum(t[3] for t in self.tensors)

    @property
    def nbytes(self) -> int:
        """Tensor bytes the header announces."""
        return sum(self.sizes)


def _version_text(value: object) -> object:
    # The version is echoed in error messages and refusals sent back to the peer: keep it small.
    if _matches(int, value) or (isinstance(value, str) and len(value) <= 32):
        return value
    return f"<{type(value).__name__}>"


def read_header(kind_frame: Any, header_frame: Any, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Header:
    """Validate a message's kind and header frames, without its data frames: field types and
    bounds, tensor descriptors, and the announced tensor bytes against ``max_message_bytes``.
    Raises ProtocolError (only)."""
    kind = _buffer(kind_frame)
    if len(kind) != 1:
        raise ProtocolError(f"kind frame must be 1 byte, got {len(kind)}")
    cls = MESSAGE_TYPES.get(kind[0])
    if cls is None:
        raise ProtocolError(f"unknown message kind {kind[0]}")
    raw_header = _buffer(header_frame)
    if len(raw_header) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(raw_header)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(
            raw_header,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=4 * MAX_TEXT_CHARS,  # utf-8 bytes; the char count is checked per field
            max_bin_len=0,
            max_ext_len=0,
            max_array_len=MAX_ITEMS,
            max_map_len=MAX_ITEMS,
        )
    except Exception as e:  # msgpack raises a zoo of types for bad input; all mean the same here
        raise ProtocolError(f"{cls.__name__}: header is not valid msgpack ({type(e).__name__}: {_short(e)})") from e
    if not isinstance(header, dict):
        raise ProtocolError(f"{cls.__name__}: header must be a map, got {type(header).__name__}")
    if not _matches(int, header.get("v")) or header["v"] != PROTOCOL_VERSION:
        raise ProtocolVersionError(_version_text(header.get("v")))
    if set(header) != {"v", "f", "t"} or not isinstance(header["f"], dict) or not isinstance(header["t"], list):
        raise ProtocolError(f"{cls.__name__}: header must hold exactly v, f (map) and t (list)")

    spec = schema(cls)
    scalar_specs = {k: s for k, s in spec.items() if s is not TENSOR}
    tensor_fields = {k for k, s in spec.items() if s is TENSOR}
    fields: dict[str, Any] = header["f"]
    if set(fields) != set(scalar_specs):
        raise ProtocolError(
            f"{cls.__name__}: header fields {_short(sorted(map(str, fields)))} != expected {sorted(scalar_specs)}"
        )
    for name, field_spec in scalar_specs.items():
        if not _matches(field_spec, fields[name]):
            raise ProtocolError(f"{cls.__name__}.{name}: {_short(fields[name])} does not fit {field_spec!r}")
        if field_spec is float:
            fields[name] = float(fields[name])

    if len(header["t"]) != len(tensor_fields):
        raise ProtocolError(f"{cls.__name__}: {len(header['t'])} tensor descriptors, expected {len(tensor_fields)}")
    descriptors = [_parse_descriptor(d, tensor_fields) for d in header["t"]]
    if sorted(d[0] for d in descriptors) != sorted(tensor_fields):
        raise ProtocolError(
            f"{cls.__name__}: tensors {[d[0] for d in descriptors]} != expected {sorted(tensor_fields)}"
        )
    sizes = [math.prod(shape) * dtype.itemsize for _, dtype, shape, _ in descriptors]
    if sum(sizes) > max_message_bytes:
        raise ProtocolError(f"{cls.__name__}: {sum(sizes)} tensor bytes exceed the limit of {max_message_bytes}")
    return Header(cls=cls, fields=fields, tensors=descriptors, sizes=sizes)


def decode(
    frames: Sequence[Any],
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    alloc: Allocator | None = None,
    copy: bool = True,
) -> Message:
    """Inverse of ``encode``. Raises ProtocolError (only) for anything malformed.

    Each tensor is copied into ``alloc(name, dtype, shape)`` if given, else into a fresh tensor;
    with ``copy=False`` a tensor of at least ``VIEW_MIN_BYTES`` is not copied at all but viewed
    where it arrived: a plain tensor if it came in one frame, a ``FramedTensor`` if in several.
    The views keep their frames alive; they are writable, and writing to them changes the frames.
    """
    if alloc is not None and not copy:
        raise ValueError(
            "alloc= and copy=False contradict each other: a tensor is either copied into storage or viewed"
        )
    if len(frames) < 2:
        raise ProtocolError(f"a message has at least 2 frames (kind, header), got {len(frames)}")
    header = read_header(frames[0], frames[1], max_message_bytes=max_message_bytes)
    cls, descriptors, sizes = header.cls, header.tensors, header.sizes
    if len(frames) != 2 + header.num_frames:
        raise ProtocolError(f"{cls.__name__}: header announces {header.num_frames} data frames, got {len(frames) - 2}")

    # Check every frame size before allocating or copying anything.
    buffers = [_buffer(f) for f in frames[2:]]
    start = 0
    for (name, _, _, n_frames), nbytes in zip(descriptors, sizes):
        lengths = [len(b) for b in buffers[start : start + n_frames]]
        if sum(lengths) != nbytes or (n_frames > 0 and min(lengths) == 0) or (nbytes > 0) != (n_frames > 0):
            raise ProtocolError(
                f"{cls.__name__}.{name}: frames hold {sum(lengths)} bytes in {n_frames} frames, shape needs {nbytes}"
            )
        start += n_frames

    tensors: dict[str, torch.Tensor | FramedTensor] = {}
    start = 0
    for (name, dtype, shape, n_frames), nbytes in zip(descriptors, sizes):
        own = buffers[start : start + n_frames]
        views = None if copy or nbytes < VIEW_MIN_BYTES else _frame_parts(own, dtype)
        if views is not None:
            start += n_frames
            if dtype == torch.bool and any(bool((v.view(torch.uint8) > 1).any()) for v in views):
                raise ProtocolError(f"{cls.__name__}.{name}: bool tensor holds bytes other than 0/1")
            tensors[name] = views[0].view(shape) if len(views) == 1 else FramedTensor(views, shape)
            continue
        out = alloc(name, dtype, shape) if alloc is not None else torch.empty(shape, dtype=dtype)
        if out.dtype != dtype or tuple(out.shape) != shape or not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError(
                f"allocator returned {out.dtype} {tuple(out.shape)} for {name}, need contiguous CPU {dtype} {shape}"
            )
        dst = out.reshape(-1).view(torch.uint8).numpy() if out.numel() else None
        offset = 0
        for buffer in own:
            assert dst is not None
            dst[offset : offset + len(buffer)] = np.frombuffer(buffer, dtype=np.uint8)
            offset += len(buffer)
        start += n_frames
        if dtype == torch.bool and dst is not None and bool((dst > 1).any()):
            raise ProtocolError(f"{cls.__name__}.{name}: bool tensor holds bytes other than 0/1")
        tensors[name] = out
    try:
        message = cls(**header.fields, **tensors)
        message.check()
    except ProtocolError:
        raise
    except Exception as e:  # a check() that trips over odd values: still the peer's fault
        raise ProtocolError(f"{cls.__name__}: refused by its checks ({type(e).__name__}: {_short(e)})") from e
    return message
