"""Drop-in ``nn.LSTM`` and ``nn.LSTMCell`` on the fused op, and ``swap`` for whole models.

The modules keep ``torch.nn``'s constructor arguments, parameter names, shapes, registration order,
initialisation and return types, so ``load_state_dict`` works both ways. They deliberately do not
subclass ``nn.RNNBase``: Dynamo graph-breaks on RNNBase instances, and these must compile with
``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from ..ops.lstm import lstm_layer

# The op's overload, resolved once: LSTMCell's lean path calls it directly.
_lstm_layer_op = torch.ops.bigmodel.lstm_layer.default

__all__ = ["LSTM", "LSTMCell", "swap"]


def _check_hidden_shape(module: str, name: str, t: Tensor, expected: tuple[int, ...], what: str) -> None:
    if tuple(t.shape) != expected:
        raise RuntimeError(
            f"bigmodel.nn.{module}: {name} must have shape {expected} {what}, got {tuple(t.shape)}"
        )


def _check_same_dtype_device(module: str, name: str, t: Tensor, ref: Tensor, ref_name: str) -> None:
    if t.dtype != ref.dtype:
        raise ValueError(
            f"bigmodel.nn.{module}: {name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}; "
            "they must match"
        )
    if t.device != ref.device:
        raise RuntimeError(
            f"bigmodel.nn.{module}: {name} is on {t.device} but {ref_name} is on {ref.device}; "
            "they must be on the same device"
        )


def _check_input_dtype(module: str, input: Tensor, weight: Tensor) -> None:
    if input.dtype != weight.dtype:
        raise ValueError(
            f"bigmodel.nn.{module}: input dtype ({input.dtype}) does not match weight dtype "
            f"({weight.dtype}). Convert input: input.to({weight.dtype}), or convert model: "
            f"model.to({input.dtype})"
        )
    if input.device != weight.device:
        raise RuntimeError(
            f"bigmodel.nn.{module}: input is on {input.device} but the weights are on {weight.device}; "
            "they must be on the same device"
        )


class LSTM(nn.Module):
    r"""Multi-layer LSTM with the interface of ``torch.nn.LSTM``, one fused op call per layer and direction.

    Args:
        input_size: features of the input ``x``.
        hidden_size: features of the cell state (and of ``h`` unless ``proj_size > 0``).
        num_layers: stacked layers. Default 1.
        bias: use ``b_ih`` and ``b_hh``. Default True.
        batch_first: input and output are ``(B, T, F)`` instead of ``(T, B, F)``; ``h``/``c`` are not
            affected. Default False.
        dropout: dropout probability on each layer's output except the last, in training. Default 0.
        bidirectional: run a second, backward direction per layer. Default False.
        proj_size: project ``h`` to this size with ``weight_hr_l{k}`` (0: no projection). Default 0.

    Parameters are named and shaped exactly as in ``torch.nn.LSTM`` (``weight_ih_l{k}``,
    ``weight_hh_l{k}``, ``bias_ih_l{k}``, ``bias_hh_l{k}``, ``weight_hr_l{k}``, and ``_reverse`` for
    the backward direction), initialised from ``U(-1/sqrt(hidden_size), 1/sqrt(hidden_size))``.

    Forward: ``lstm(input, hx=None, *, lengths=None) -> (output, (h_n, c_n))`` with ``D = 2`` if
    bidirectional else 1 and ``P = proj_size or hidden_size``:

    - ``input``: ``(T, B, input_size)`` (``(B, T, input_size)`` if batch_first), ``(T, input_size)``
      unbatched, or a ``PackedSequence`` (output is then a ``PackedSequence`` with the same
      ``batch_sizes``, ``sorted_indices`` and ``unsorted_indices``).
    - ``hx``: ``(h_0 (L*D, B, P), c_0 (L*D, B, hidden_size))`` (without ``B`` when unbatched), or None
      for zeros. Batch order is the caller's, also for a PackedSequence.
    - ``lengths``: optional ``(B,)`` integer tensor with values in ``[1, T]``: variable length on a
      padded input without packing. Steps past a sequence's end leave its state alone and give zero
      output; ``h_n``/``c_n`` are the state after its last valid step, as with a PackedSequence.
      Unbatched input takes a ``(1,)`` tensor.
    - ``output``: ``(T, B, D*P)`` (``(B, T, D*P)`` if batch_first, ``(T, D*P)`` unbatched);
      ``h_n``: ``(L*D, B, P)``; ``c_n``: ``(L*D, B, hidden_size)``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(dropout, numbers.Number) or not 0 <= dropout <= 1 or isinstance(dropout, bool):
            raise ValueError(
                "dropout should be a number in range [0, 1] representing the probability of an element "
                "being zeroed"
            )
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so non-zero dropout "
                f"expects num_layers greater than 1, but got dropout={dropout} and num_layers={num_layers}",
                stacklevel=2,
            )
        if not isinstance(bias, bool):
            raise TypeError(f"bias should be of type bool, got: {type(bias).__name__}")
        if not isinstance(batch_first, bool):
            raise TypeError(f"batch_first should be of type bool, got: {type(batch_first).__name__}")
        if not isinstance(input_size, int):
            raise TypeError(f"input_size should be of type int, got: {type(input_size).__name__}")
        if input_size <= 0:
            raise ValueError("input_size must be greater than zero")
        if not isinstance(hidden_size, int):
            raise TypeError(f"hidden_size should be of type int, got: {type(hidden_size).__name__}")
        if hidden_size <= 0:
            raise ValueError("hidden_size must be greater than zero")
        if num_layers <= 0:
            raise ValueError("num_layers must be greater than zero")
        if proj_size < 0:
            raise ValueError("proj_size should be a positive integer or zero to disable projections")
        if proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")

        self.mode = "LSTM"
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size

        factory = {"device": device, "dtype": dtype}
        num_directions = 2 if bidirectional else 1
        real_hidden_size = proj_size if proj_size > 0 else hidden_size
        gate_size = 4 * hidden_size
        self._flat_weights_names: list[str] = []
        self._all_weights: list[list[str]] = []
        for layer in range(num_layers):
            layer_input_size = input_size if layer == 0 else real_hidden_size * num_directions
            for direction in range(num_directions):
                suffix = "_reverse" if direction == 1 else ""
                shapes = {
                    f"weight_ih_l{layer}{suffix}": (gate_size, layer_input_size),
                    f"weight_hh_l{layer}{suffix}": (gate_size, real_hidden_size),
                }
                if bias:
                    shapes[f"bias_ih_l{layer}{suffix}"] = (gate_size,)
                    shapes[f"bias_hh_l{layer}{suffix}"] = (gate_size,)
                if proj_size > 0:
                    shapes[f"weight_hr_l{layer}{suffix}"] = (proj_size, hidden_size)
                for name, shape in shapes.items():
                    setattr(self, name, nn.Parameter(torch.empty(shape, **factory)))
                self._flat_weights_names.extend(shapes)
                self._all_weights.append(list(shapes))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    def flatten_parameters(self) -> None:
        """No-op, kept for drop-in compatibility: the fused op reads the parameters as they are."""

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        """Per layer and direction, its parameters in registration order (as ``nn.LSTM.all_weights``)."""
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    @property
    def _flat_weights(self) -> list[nn.Parameter]:
        return [getattr(self, name) for name in self._flat_weights_names]

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size != 0:
            s += f", proj_size={self.proj_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        if self.batch_first is not False:
            s += f", batch_first={self.batch_first}"
        if self.dropout != 0:
            s += f", dropout={self.dropout}"
        if self.bidirectional is not False:
            s += f", bidirectional={self.bidirectional}"
        return s

    # ---- forward ----

    def forward(
        self,
        input: Tensor | PackedSequence,
        hx: tuple[Tensor, Tensor] | None = None,
        *,
        lengths: Tensor | None = None,
    ) -> tuple[Tensor | PackedSequence, tuple[Tensor, Tensor]]:
        if isinstance(input, PackedSequence):
            if lengths is not None:
                raise ValueError(
                    "bigmodel.nn.LSTM: lengths must be None for a PackedSequence input, which carries "
                    "its own lengths"
                )
            return self._forward_packed(input, hx)

        _check_input_dtype("LSTM", input, self.weight_ih_l0)
        if input.dim() not in (2, 3):
            raise ValueError(
                f"bigmodel.nn.LSTM: input must be 2-D (T, input_size) unbatched or 3-D "
                f"({'B, T' if self.batch_first else 'T, B'}, input_size) batched, got {input.dim()}-D "
                f"shape {tuple(input.shape)}"
            )
        is_batched = input.dim() == 3
        if not is_batched:
            input = input.unsqueeze(1)
        elif self.batch_first:
            input = input.transpose(0, 1)
        if hx is not None:
            hx = self._check_hx_rank(hx, is_batched)
        output, h_n, c_n = self._run(input, hx, lengths)
        if not is_batched:
            return output.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        if self.batch_first:
            output = output.transpose(0, 1)
        return output, (h_n, c_n)

    def _forward_packed(
        self, input: PackedSequence, hx: tuple[Tensor, Tensor] | None
    ) -> tuple[PackedSequence, tuple[Tensor, Tensor]]:
        data = input.data
        _check_input_dtype("LSTM", data, self.weight_ih_l0)
        if data.dim() != 2:
            raise ValueError(
                f"bigmodel.nn.LSTM: a PackedSequence's data must be 2-D (sum(lengths), input_size), got "
                f"{data.dim()}-D shape {tuple(data.shape)}"
            )
        if hx is not None:
            hx = self._check_hx_rank(hx, is_batched=True)
        # Padded, in the caller's batch order (pad_packed_sequence applies unsorted_indices).
        padded, lengths = pad_packed_sequence(input)
        output, h_n, c_n = self._run(padded, hx, lengths)
        # Pack back with the input's own permutation, so batch_sizes and indices are unchanged.
        sorted_indices = input.sorted_indices
        if sorted_indices is not None:
            output = output.index_select(1, sorted_indices)
            lengths = lengths.index_select(0, sorted_indices.to(lengths.device))
        packed = pack_padded_sequence(output, lengths, enforce_sorted=True)
        out = PackedSequence(packed.data, input.batch_sizes, input.sorted_indices, input.unsorted_indices)
        return out, (h_n, c_n)

    def _check_hx_rank(self, hx: tuple[Tensor, Tensor], is_batched: bool) -> tuple[Tensor, Tensor]:
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise ValueError(
                f"bigmodel.nn.LSTM: hx must be a tuple (h_0, c_0), got {type(hx).__name__}"
                + (f" of length {len(hx)}" if isinstance(hx, (tuple, list)) else "")
            )
        h0, c0 = hx
        rank = 3 if is_batched else 2
        if h0.dim() != rank or c0.dim() != rank:
            kind = "batched 3-D" if is_batched else "unbatched 2-D"
            raise RuntimeError(
                f"bigmodel.nn.LSTM: for {kind} input, hx (h_0, c_0) must be {rank}-D, got "
                f"({h0.dim()}-D, {c0.dim()}-D) tensors"
            )
        if not is_batched:
            h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        return h0, c0

    def _run(
        self, input: Tensor, hx: tuple[Tensor, Tensor] | None, lengths: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """All layers on time-major ``input (T, B, I)``; returns ``(output, h_n, c_n)``."""
        T, B, features = input.shape
        if features != self.input_size:
            raise RuntimeError(
                f"bigmodel.nn.LSTM: input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                f"got {features}"
            )
        if B == 0:
            raise ValueError(
                f"bigmodel.nn.LSTM: input has an empty batch (B = 0), shape {tuple(input.shape)}"
            )
        if T == 0:
            raise ValueError(
                "bigmodel.nn.LSTM: input must have at least one time step, got T = 0, shape "
                f"{tuple(input.shape)}"
            )
        num_directions = 2 if self.bidirectional else 1
        P = self.proj_size if self.proj_size > 0 else self.hidden_size
        LD = self.num_layers * num_directions
        if hx is None:
            h0 = input.new_zeros((LD, B, P))
            c0 = input.new_zeros((LD, B, self.hidden_size))
        else:
            h0, c0 = hx
            _check_hidden_shape(
                "LSTM",
                "hx[0] (h_0)",
                h0,
                (LD, B, P),
                "(num_layers * num_directions, batch, proj_size or hidden_size)",
            )
            _check_hidden_shape(
                "LSTM",
                "hx[1] (c_0)",
                c0,
                (LD, B, self.hidden_size),
                "(num_layers * num_directions, batch, hidden_size)",
            )
            _check_same_dtype_device("LSTM", "hx[0] (h_0)", h0, input, "input")
            _check_same_dtype_device("LSTM", "hx[1] (c_0)", c0, input, "input")
        if lengths is not None:
            lengths = self._check_lengths(lengths, B)

        h_n: list[Tensor] = []
        c_n: list[Tensor] = []
        x = input
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(num_directions):
                k = layer * num_directions + direction
                w = self._layer_weights(k)
                out, h, c = lstm_layer(x, h0[k], c0[k], *w, lengths=lengths, reverse=direction == 1)
                outputs.append(out)
                h_n.append(h)
                c_n.append(c)
            x = outputs[0] if num_directions == 1 else torch.cat(outputs, dim=2)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, p=self.dropout, training=True)
        return x, torch.stack(h_n), torch.stack(c_n)

    def _layer_weights(self, k: int) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
        w = [getattr(self, name) for name in self._all_weights[k]]
        b_ih, b_hh = (w[2], w[3]) if self.bias else (None, None)
        w_hr = w[-1] if self.proj_size > 0 else None
        return w[0], w[1], b_ih, b_hh, w_hr

    @staticmethod
    def _check_lengths(lengths: Tensor, batch: int) -> Tensor:
        if not isinstance(lengths, Tensor):
            lengths = torch.as_tensor(lengths)
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise ValueError(
                f"bigmodel.nn.LSTM: lengths must be an integer tensor, got dtype {lengths.dtype}"
            )
        if lengths.dim() != 1 or lengths.shape[0] != batch:
            raise ValueError(
                f"bigmodel.nn.LSTM: lengths must be 1-D with one entry per sequence, expected shape "
                f"({batch},), got {tuple(lengths.shape)}"
            )
        # Values (1 <= lengths[b] <= T) are checked by the op, which reads them anyway.
        return lengths


class LSTMCell(nn.Module):
    r"""One LSTM step with the interface of ``torch.nn.LSTMCell``, on the fused op (``T = 1``).

    Args:
        input_size: features of the input ``x``.
        hidden_size: features of ``h`` and ``c``.
        bias: use ``bias_ih`` and ``bias_hh``. Default True.

    Parameters ``weight_ih (4H, input_size)``, ``weight_hh (4H, H)``, ``bias_ih (4H)``, ``bias_hh (4H)``
    as in ``torch.nn.LSTMCell``.

    Forward: ``cell(input, hx=None) -> (h', c')`` with ``input (B, input_size)`` or ``(input_size,)``
    unbatched, ``hx = (h (B, H), c (B, H))`` (without ``B`` when unbatched) or None for zeros.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.weight_ih = nn.Parameter(torch.empty((4 * hidden_size, input_size), **factory))
        self.weight_hh = nn.Parameter(torch.empty((4 * hidden_size, hidden_size), **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(4 * hidden_size, **factory))
            self.bias_hh = nn.Parameter(torch.empty(4 * hidden_size, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        return s

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        w_ih, w_hh, b_ih, b_hh = self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh
        # The common call (batched input, a (h, c) pair, no CPU autocast) goes straight to the op, whose
        # C++ checks cover every argument; only when it rejects them do the module's checks run, to
        # name the problem in nn.LSTMCell's terms. A decoding loop calls this once per token, and at
        # batch 1 each Python check costs about 1% of the step (NOTES v22).
        if (
            type(hx) is tuple
            and len(hx) == 2
            and input.dim() == 2
            and not (input.is_cpu and torch.is_autocast_enabled("cpu"))
        ):
            h, c = hx
            try:
                train = torch.is_grad_enabled() and (
                    w_ih.requires_grad
                    or input.requires_grad
                    or h.requires_grad
                    or c.requires_grad
                    or w_hh.requires_grad
                    or (b_ih is not None and (b_ih.requires_grad or b_hh.requires_grad))
                )
                out = _lstm_layer_op(
                    input.unsqueeze(0), h, c, w_ih, w_hh, b_ih, b_hh, None, None, False, train
                )
            except (RuntimeError, ValueError, TypeError, AttributeError) as e:
                error = e
            else:
                return out[1], out[2]
            self._check_args(input, hx)  # raises the module's own message where one applies
            raise error
        return self._forward_checked(input, hx)

    def _check_args(self, input: Tensor, hx: tuple[Tensor, Tensor] | None) -> None:
        _check_input_dtype("LSTMCell", input, self.weight_ih)
        if input.dim() not in (1, 2):
            raise ValueError(
                "bigmodel.nn.LSTMCell: input must be 1-D (input_size,) unbatched or 2-D (batch, "
                f"input_size), got {input.dim()}-D shape {tuple(input.shape)}"
            )
        if hx is not None:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise ValueError(f"bigmodel.nn.LSTMCell: hx must be a tuple (h, c), got {type(hx).__name__}")
            for idx, value in enumerate(hx):
                if not isinstance(value, Tensor):
                    raise TypeError(
                        f"bigmodel.nn.LSTMCell: hx[{idx}] must be a Tensor, got {type(value).__name__}"
                    )
                if value.dim() != input.dim():
                    raise ValueError(
                        f"bigmodel.nn.LSTMCell: hx[{idx}] must be {input.dim()}-D like input, got "
                        f"{value.dim()}-D shape {tuple(value.shape)}"
                    )
        B, features = (1, input.shape[0]) if input.dim() == 1 else input.shape
        if features != self.input_size:
            raise RuntimeError(
                "bigmodel.nn.LSTMCell: input.size(-1) must be equal to input_size. Expected "
                f"{self.input_size}, got {features}"
            )
        if B == 0:
            raise ValueError(
                f"bigmodel.nn.LSTMCell: input has an empty batch (B = 0), shape {tuple(input.shape)}"
            )
        if hx is not None:
            shape, what = ((B, self.hidden_size), "(batch, hidden_size)")
            if input.dim() == 1:
                shape, what = ((self.hidden_size,), "(hidden_size,) unbatched")
            for name, t in (("hx[0] (h)", hx[0]), ("hx[1] (c)", hx[1])):
                _check_hidden_shape("LSTMCell", name, t, shape, what)
                _check_same_dtype_device("LSTMCell", name, t, input, "input")

    def _forward_checked(self, input: Tensor, hx: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        """Every other call: unbatched input, no hx, a list for hx, CPU autocast, or bad arguments."""
        self._check_args(input, hx)
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
            if hx is not None:
                hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        if hx is None:
            h = c = input.new_zeros((input.shape[0], self.hidden_size))
        else:
            h, c = hx
        # nn.LSTMCell's op is not on ATen's CPU autocast list (nn.LSTM's is): it stays in the input's
        # dtype there, so this one does too.
        args = (input.unsqueeze(0), h, c, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        with torch.autocast("cpu", enabled=False):
            _, h_new, c_new = lstm_layer(*args)
        if not is_batched:
            return h_new.squeeze(0), c_new.squeeze(0)
        return h_new, c_new


def _fused_like(module: nn.LSTM | nn.LSTMCell) -> LSTM | LSTMCell:
    """A fused module holding ``module``'s very Parameter objects (built on meta, then adopted)."""
    dtype = module.weight_ih_l0.dtype if isinstance(module, nn.LSTM) else module.weight_ih.dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nn.LSTM already warned about dropout with one layer
        if isinstance(module, nn.LSTM):
            fused: LSTM | LSTMCell = LSTM(
                module.input_size,
                module.hidden_size,
                module.num_layers,
                module.bias,
                module.batch_first,
                module.dropout,
                module.bidirectional,
                module.proj_size,
                device="meta",
                dtype=dtype,
            )
        else:
            fused = LSTMCell(module.input_size, module.hidden_size, module.bias, device="meta", dtype=dtype)
    own = dict(module.named_parameters(recurse=False))
    names = [name for name, _ in fused.named_parameters(recurse=False)]
    if sorted(own) != sorted(names):
        raise ValueError(
            f"bigmodel.nn.swap: cannot swap {type(module).__name__} whose parameters are {sorted(own)}; "
            f"expected {sorted(names)}"
        )
    for name in names:
        setattr(fused, name, own[name])
    fused.train(module.training)
    return fused


def swap(model: nn.Module) -> nn.Module:
    """Replaces every ``nn.LSTM``, ``nn.LSTMCell`` and ``nn.MultiheadAttention`` in ``model`` by
    bigmodel's module, in place.

    The replacements hold the very same Parameter objects (nothing is copied or re-initialised, so
    optimizers and tied weights keep working) and the same training mode. Subclasses of ``nn.LSTM``
    are left alone, since they may change its behaviour. A module shared by several parents is
    replaced by one shared fused module.

    Returns ``model``, or its replacement when ``model`` itself is one of those modules.
    """
    # id -> (original, replacement); holding the original keeps its id from being reused meanwhile.
    seen: dict[int, tuple[nn.Module, nn.Module]] = {}

    def convert(module: nn.Module) -> nn.Module:
        if id(module) in seen:
            return seen[id(module)][1]
        if type(module) in (nn.LSTM, nn.LSTMCell):
            seen[id(module)] = (module, _fused_like(module))
        elif type(module) is nn.MultiheadAttention:
            seen[id(module)] = (module, _fused_attention_like(module))
        else:
            seen[id(module)] = (module, module)
            for name, child in module._modules.items():
                if child is not None:
                    module._modules[name] = convert(child)
        return seen[id(module)][1]

    return convert(model)


def _fused_attention_like(module: nn.MultiheadAttention) -> nn.Module:
    """bigmodel's MultiheadAttention subclasses nn.MultiheadAttention and adds no state, so the
    replacement takes over the original's attributes: the same Parameters, buffers, flags and mode."""
    from .attention import MultiheadAttention

    fused = MultiheadAttention.__new__(MultiheadAttention)
    fused.__dict__.update(module.__dict__)
    return fused
