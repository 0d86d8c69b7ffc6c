"""Export to a full-integer TFLite model that keeps the learned integers.

A trained tfdq layer computes with ``Q(W) = k * d``: integers ``|k| <=
2^(b-1) - 1`` (uniform quantizers; power of two: ``k = +-2^j``, step
``q_min``) times the learned step ``d``. :func:`to_tflite` builds, from the
Keras model, a TensorFlow graph that the TF 2.21 TFLite converter turns into
an int8 model whose kernels hold exactly those integers:

* Kernels: a constant ``k * d * s_c`` passes a FakeQuant with
  ``num_bits=4, narrow_range=True, min/max = -/+7 d s_c`` where the kernel
  is stored in fewer than 8 bits (the converter stores it as packed int4:
  ``|k| <= 7`` stays exact) and ``num_bits=8``, ``-/+127 d s_c`` otherwise.
  So the scale is ``d`` (per tensor) or ``d |s_c|`` (per output channel) and
  every stored integer is a learned one. ``num_bits`` 2, 3 or 5-7 would make
  the converter re-spread the values (docs/design.md), so they are never
  used; int2 kernels are packed by tfdq after the conversion.
* Storage (``storage=``): ``"fast"`` (default) puts every operator where
  LiteRT's XNNPACK delegate runs it and, subject to that, stores the fewest
  bytes where that costs no time: a Dense or 1x1 stride-1 convolution with
  ``b <= 4`` and at most 36 output positions per example (``H*W``; 1 for a
  Dense) becomes a FULLY_CONNECTED over the channel axis with per-channel
  int4 weights (``b <= 2`` at one position: int2; XNNPACK needs even input
  channels for int4 and a multiple of 4 for int2, else the next wider type
  with a ``storage_note``); more positions: int8, as XNNPACK's int4 kernel
  costs more per multiply-add than it saves in bytes there
  (:mod:`tfdq.export.storage`),
  3x3 and depthwise convolutions int8 (XNNPACK runs no sub-byte CONV_2D or
  DEPTHWISE_CONV_2D). ``"smallest"`` stores int4/int2 wherever LiteRT runs
  it (int4 convolutions in its slower builtin kernels); ``"int8"`` stores
  every kernel int8. The report says per layer: operator, storage, bytes,
  and whether XNNPACK runs it, asked of the runtime
  (:func:`~tfdq.export.runtime.xnnpack_delegated`).
* BatchNormalization right after a quantized Conv2D / DepthwiseConv2D /
  Dense is folded into per-channel scales, not into the integers:
  ``s_c = gamma_c / sqrt(var_c + eps)``, kernel scale ``d |s_c|`` (a negative
  ``s_c`` flips the sign of that channel's integers: TFLite scales are
  positive), folded bias ``s_c (Q(bias) - mean_c) + beta_c`` in the int32
  bias.
* Activations: an :class:`~tfdq.layers.ActivationQuantizer` with step ``d``
  and ``n = round(q_max / d)`` levels becomes an int8 tensor of scale ``d``.
  Unsigned (after ReLU): zero point ``127 - n``, so that int8 saturation is
  the clamp at ``q_max`` (``n = 255``, 8 bits: zero point -128) and the
  producer's fused ReLU/ReLU6 is the clamp at 0 (on the model input, which
  has no producer, zero point -128 and a clamp at ``n d``); signed: zero point
  ``n - 128`` plus a clamp at ``n d``. Each such clamp is an int8 QUANTIZE on
  the same scale to zero point ``127 - n`` (saturation at ``n d``, nothing
  rounds), which LiteRT's XNNPACK delegate runs, where the converter writes a
  MINIMUM, which it does not (:mod:`tfdq.export.clamps`; the report's
  ``clamps``). The learned grid, range and
  rounding are those of the Keras model.
* Tensors that no learned quantizer covers get a power-of-two scale
  calibrated on ``calibration_data`` (an ``Add`` input takes the step of the
  learned quantizer after the sum when its range fits, which keeps the sum
  exact); every such tensor is listed in the export report with its scale
  and observed range. ``quantize_model`` puts learned quantizers on ``Add``
  / ``Concatenate`` operands and pooled maps, so in its models only the
  logits are calibrated.
* A global average pooling followed by a learned quantizer is a
  DEPTHWISE_CONV_2D with a constant kernel (``1 / (H W)``, or the integer 2
  at half that scale and an int32 bias of 1 for a non-negative map), whose
  requantization rounds ties like the quantizer (LiteRT's MEAN rounds ties
  to even).
* A sum is one ADD whose requantization (XNNPACK) rounds ties up; the signed
  quantizer after it rounds them up too (``ActivationQuantizer(ties="up")``,
  set by ``quantize_model``), so the file's sum is the Keras one element for
  element. ``verify`` notes a quantizer after a sum that rounds ties away.
* A sigmoid is one LOGISTIC (int8 output at TFLite's fixed scale 1/256), a
  swish a LOGISTIC and a MUL. ``quantize_model`` puts a learned quantizer on
  their input (splitting a fused ``activation="swish"`` / ``"sigmoid"`` off
  its kernel layer), rounds the Keras sigmoid onto the 1/256 grid as the
  file's lookup table does (``tfdq.layers.int8_sigmoid``, ``int8_swish``),
  and the quantizer after a MUL by a LOGISTIC output (a swish, a
  sigmoid-gated ``Multiply``) rounds ties to even as XNNPACK's MUL does
  (``ties="even"``): EfficientNet's swish and squeeze-and-excite gates
  export with every learned map equal.
* A ReLU with its own learned quantizer that reads a tensor on a finer grid
  (Xception's residual sums, which the next sum also reads) is an int8 RELU
  that requantizes, and LiteRT's kernel rounds that twice (at a ratio of
  1/8, ``k + 3/8`` steps become ``k + 1``). After the conversion each such
  RELU (RELU6, RELU_N1_TO_1) writes a tensor on a scale ``2^-20`` wider,
  which makes it round once (half away, as the quantizer), and a QUANTIZE
  puts it back on the learned scale (:mod:`tfdq.export.relus`; checked on
  all 256 int8 levels in LiteRT, the report's ``relus``).
* A hard-swish (``Activation("hard_swish")``) is one HARD_SWISH from its learned input grid onto
  the learned grid after it. LiteRT's int8 kernel computes it in 16-bit fixed point and rounds
  some values (half-way points above x = 3 among them) one step away from ``x relu6(x + 3) / 6``
  rounded once; ``quantize_model`` puts a ``tfdq.layers.QHardSwish`` there, whose forward pass
  gives the kernel's levels (a table of the 512 input values computed from the two steps as
  the kernel's Prepare and Eval do; the gradient is the float function's), so the file's
  hard-swish maps equal Keras' (MobileNetV3).
* A sub-byte kernel outside XNNPACK whose output stays signed is stored
  int8: LiteRT's builtin int4 CONV_2D / DEPTHWISE_CONV_2D (and
  FULLY_CONNECTED) rounds twice, which no bias can undo for negative
  outputs (the report's ``storage_note``).

After the conversion the file is read back: every kernel must hold the
planned integers with the planned scale and storage type, and no operation
may compute in float (only the QUANTIZE/DEQUANTIZE at a float input or
output), or :class:`ExportError` is raised. :func:`verify` runs the file in
LiteRT next to the Keras model.

Fidelity: TFLite adds an int32 bias to the integer accumulator (unit
``s_in d |s_c|``), so a folded BatchNorm bias is rounded to that grid, and
LiteRT 2.3 requantizes its builtin sub-byte kernels (int4 CONV_2D and
DEPTHWISE_CONV_2D, a FULLY_CONNECTED that XNNPACK does not take) with two
roundings (XNNPACK rounds once: int8 kernels and the int4/int2
FULLY_CONNECTED; measured in tests/test_storage_policy.py), which for a non-negative output is
one rounding with every threshold ``w_c = 2^30 / m_c`` accumulator units
lower. The planned int32 bias is ``round(B_c - w_c)`` (``w_c = 0`` where
the kernel rounds once), and :func:`align_biases` (given the same
``storage`` as the export) moves each folded beta by
less than one accumulator unit so that ``B_c - w_c`` is an integer: the
Keras model then computes, tensor for tensor, what the file computes (the
export report lists each layer's residual). The converter quantizes the bias
from a float32 constant, so an int32 bias beyond 2^22 units (a channel with
an untrained BatchNorm mean, or a gamma near zero and a large beta) can move
by ``|B| 2^-22`` units; the report gives each layer's ``file_difference``,
and a bias beyond int32 is refused. What remains is the rounding of
tensors that only the file quantizes (the calibrated logits); :func:`verify`
measures it.

Use::

    tfdq.export.align_biases(qmodel, x_train[:1000])     # once training is over (storage="fast")
    tflite, report = tfdq.export.to_tflite(qmodel, x_train[:1000], return_report=True)
    print(tfdq.export.verify(qmodel, tflite, (x_test, y_test), export_report=report).format())

or ``tfdq-export --model=m.keras`` from a shell.

Unsupported, with an error that names the layers: bitwidths above 8,
power-of-two weight grids with ``q_max / q_min > 64`` (not on an int8 grid of
step ``q_min``), power-of-two *activation* quantizers (their log-domain
rounding has no integer TFLite kernel), layers without an integer export.
"""

from tfdq.export.align import align_biases
from tfdq.export.convert import ExportReport, float_tflite, save_tflite, to_tflite
from tfdq.export.flatbuffer import inspect_tflite
from tfdq.export.pipeline import export_and_verify
from tfdq.export.plan import STORAGE_POLICIES, ExportError
from tfdq.export.runtime import LiteRTRunner
from tfdq.export.runtime import predict as litert_predict
from tfdq.export.verify import VerificationReport, size_report, verify

__all__ = [
    "ExportError",
    "ExportReport",
    "LiteRTRunner",
    "STORAGE_POLICIES",
    "VerificationReport",
    "align_biases",
    "export_and_verify",
    "float_tflite",
    "inspect_tflite",
    "litert_predict",
    "save_tflite",
    "size_report",
    "to_tflite",
    "verify",
]
