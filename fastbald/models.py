"""The Bayesian CNN of Gal, Islam & Ghahramani (2017), "Deep Bayesian Active Learning with Image
Data", and its deterministic counterpart.

Architecture (the authors' Keras code, valid padding)::

    trunk: conv 32@4x4 -> ReLU -> conv 32@4x4 -> ReLU -> max-pool 2x2      (1x28x28 -> 32x11x11)
    head:  dropout 0.25 -> flatten -> dense 128 -> ReLU -> dropout 0.5 -> dense C   (-> logits)

The split matters for MC-dropout inference: the trunk has no randomness, so it can run once per
pool item and only the head needs the T stochastic passes (``model(x) == head(trunk(x))``).

Initialisation: PyTorch's defaults (Kaiming-uniform weights with ``a=sqrt(5)``, uniform biases),
not Keras 1's Glorot-uniform weights and zero biases.

Weight decay: the authors regularise only the kernel of the 128-unit dense layer, with Keras'
``l2(c / N_train)``, ``c = 3.5`` and ``N_train`` the current number of labelled images. Keras adds
``lambda * ||W||^2`` to the loss, whose gradient is ``2 * lambda * W``; ``torch.optim.Adam``'s
(coupled, L2-style) ``weight_decay=wd`` adds ``wd * W`` to the gradient, so the equivalent is
``wd = 2 * c / N_train`` (:func:`paper_weight_decay`), used with :meth:`BayesianCNN.param_groups`
and ``torch.optim.Adam`` (not AdamW, whose decoupled decay is a different regulariser).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import cast

import torch
from torch import nn

__all__ = ["BayesianCNN", "DeterministicCNN", "paper_weight_decay"]

_FILTERS = 32
_KERNEL = 4
_POOL = 2
_HIDDEN = 128


def paper_weight_decay(n_train: int, c: float = 3.5) -> float:
    """PyTorch ``weight_decay`` equivalent to the authors' Keras ``l2(c / n_train)``: ``2c/n``.

    Apply it to :meth:`BayesianCNN.param_groups` with ``torch.optim.Adam``.
    """
    if n_train <= 0:
        raise ValueError(f"n_train must be positive, got {n_train}")
    return 2.0 * c / n_train


class BayesianCNN(nn.Module):
    """The paper's MC-dropout CNN, split into a deterministic ``trunk`` and a stochastic ``head``.

    Args:
        num_classes: number of output logits.
        dropout_conv: dropout probability after the max-pool (first layer of the head).
        dropout_fc: dropout probability after the 128-unit dense layer.
        deterministic: if True, acquisition should use this network's single deterministic
            prediction (dropout off), as in the paper's Bayesian-vs-deterministic comparison;
            dropout is still used in training as a regulariser. Exposed as :attr:`mc_dropout`.
        in_channels: input channels (1 for MNIST).
        image_size: input height = width (28 for MNIST).

    ``forward`` returns logits ``[B, num_classes]``; ``model(x) == model.head(model.trunk(x))``
    exactly (in train mode too, for the same RNG state).
    """

    def __init__(
        self,
        num_classes: int = 10,
        dropout_conv: float = 0.25,
        dropout_fc: float = 0.5,
        *,
        deterministic: bool = False,
        in_channels: int = 1,
        image_size: int = 28,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        for name, p in (("dropout_conv", dropout_conv), ("dropout_fc", dropout_fc)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")
        conv_out = image_size - 2 * (_KERNEL - 1)
        if conv_out < _POOL:
            raise ValueError(f"image_size {image_size} is too small for two valid 4x4 convs")
        side = conv_out // _POOL
        self.num_classes = num_classes
        self.deterministic = bool(deterministic)
        self.feature_shape: tuple[int, int, int] = (_FILTERS, side, side)
        self.num_features = _FILTERS * side * side

        self.trunk = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(in_channels, _FILTERS, _KERNEL),  # valid padding
                relu1=nn.ReLU(inplace=True),  # no copy of the conv output
                conv2=nn.Conv2d(_FILTERS, _FILTERS, _KERNEL),
                relu2=nn.ReLU(inplace=True),  # no copy of the conv output
                pool=nn.MaxPool2d(_POOL),
            )
        )
        self.head = nn.Sequential(
            OrderedDict(
                dropout1=nn.Dropout(dropout_conv),
                flatten=nn.Flatten(),
                fc1=nn.Linear(self.num_features, _HIDDEN),
                relu3=nn.ReLU(),
                dropout2=nn.Dropout(dropout_fc),
                fc2=nn.Linear(_HIDDEN, num_classes),
            )
        )
        # Channels-last convolution weights: oneDNN then runs both convolutions in NHWC (the
        # input may stay NCHW), 1.3-1.7x faster on this project's CPU in training and inference.
        # The values are the same function; the layout is kept by reset_parameters(),
        # load_state_dict() and .to(device).
        for conv in (self.trunk.conv1, self.trunk.conv2):
            conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)

    @property
    def mc_dropout(self) -> bool:
        """Whether acquisition should use MC dropout (T stochastic head passes).

        False for the deterministic baseline: one pass in eval mode.
        """
        return not self.deterministic

    @property
    def fc1(self) -> nn.Linear:
        """The 128-unit dense layer (the one the authors regularise)."""
        return cast(nn.Linear, self.head.fc1)

    @property
    def fc2(self) -> nn.Linear:
        """The output dense layer."""
        return cast(nn.Linear, self.head.fc2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` for images ``[B, in_channels, H, W]``."""
        return self.head(self.trunk(x))

    def split(self) -> tuple[nn.Module, nn.Module]:
        """``(trunk, head)``: the model's own submodules (shared, not copies).

        ``trunk`` maps images to features ``[B, *feature_shape]`` with no randomness; ``head``
        maps those features to logits and holds every dropout layer.
        """
        return self.trunk, self.head

    def dropout_modules(self) -> list[nn.Dropout]:
        """The dropout layers (all in the head)."""
        return [m for m in self.modules() if isinstance(m, nn.Dropout)]

    def dense_parameters(self, *, weights_only: bool = False) -> list[nn.Parameter]:
        """Parameters of the two dense layers (``fc1``, ``fc2``); only their weight matrices if
        ``weights_only``."""
        params: list[nn.Parameter] = []
        for layer in (self.fc1, self.fc2):
            params.append(layer.weight)
            if not weights_only:
                params.append(layer.bias)
        return params

    def conv_parameters(self) -> list[nn.Parameter]:
        """Parameters of the two convolutions (the trunk)."""
        return list(self.trunk.parameters())

    def param_groups(self, weight_decay: float, *, scope: str = "paper") -> list[dict[str, object]]:
        """Optimizer parameter groups with L2 weight decay on dense-layer weights only.

        Args:
            weight_decay: the PyTorch (gradient-side) coefficient, e.g.
                :func:`paper_weight_decay` ``(n_train)``.
            scope: ``"paper"``: decay only the 128-unit dense layer's weight matrix, as the
                authors' code does; ``"dense"``: decay both dense layers' weights and biases.

        Returns:
            Two groups covering every parameter exactly once: the decayed ones, then the rest
            with ``weight_decay=0``. Pass to ``torch.optim.Adam``.
        """
        if scope == "paper":
            decayed = [self.fc1.weight]
        elif scope == "dense":
            decayed = self.dense_parameters()
        else:
            raise ValueError(f"scope must be 'paper' or 'dense', got {scope!r}")
        ids = {id(p) for p in decayed}
        rest = [p for p in self.parameters() if id(p) not in ids]
        return [
            {"params": decayed, "weight_decay": float(weight_decay)},
            {"params": rest, "weight_decay": 0.0},
        ]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialise every layer with PyTorch's default initialisation (uses the global RNG).

        The paper re-trains from scratch after each acquisition.
        """
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.reset_parameters()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, mc_dropout={self.mc_dropout}"


class DeterministicCNN(BayesianCNN):
    """The same CNN for the paper's deterministic baseline: ``mc_dropout`` is False, so
    acquisition uses one deterministic (eval-mode) prediction. Dropout still regularises training.
    """

    def __init__(
        self,
        num_classes: int = 10,
        dropout_conv: float = 0.25,
        dropout_fc: float = 0.5,
        *,
        in_channels: int = 1,
        image_size: int = 28,
    ) -> None:
        super().__init__(
            num_classes,
            dropout_conv,
            dropout_fc,
            deterministic=True,
            in_channels=in_channels,
            image_size=image_size,
        )
