r"""Kronecker-factored curvature kept per output, for one noise per output.

With one observation noise per output, ``Lambda = diag(w)``, ``w_c = 1 / (sigma_c^2
T)``, the GGN is ``sum_c w_c H_c`` with ``H_c`` the curvature of output ``c`` alone
(the likelihood's ``output_column(c)``). KFAC keeps this linearity: the block of a
linear layer is

$$
    \sum_c w_c \, G_c \otimes A = \Big(\sum_c w_c G_c\Big) \otimes A,
$$

since the input-side factor ``A`` does not depend on the loss and is the same for
every output. ``OutputKron`` therefore holds, per parameter tensor, that shared
factor once and the other factor once per output, and gives the ``Kron`` of any
weights ``w`` (``weighted``) and its eigendecomposition (``decompose``), with the
shared factors decomposed once. This is exact KFAC of the weighted loss at every
``w``, so no refit is needed when the noise changes.

Which factor of a pair is shared is read from the outputs' factors, not assumed: it
is the one that agrees over all outputs (the factor ``Kron.averaged`` marks when
both do, e.g. for one output). A layout in which the input side is summed and the
gradient side averaged (the engine's embeddings and ``(in, out)`` weights) is then
handled alike, with the number of outputs moved from the gradient side to the
input side as in a fit of all outputs together; a pair in which neither factor
agrees is refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from laplace.curvature.kron_assembly import merge_factors
from laplace.utils.matrix import Kron, KronDecomposed

Tensor = torch.Tensor


def _agree(factors: Sequence[Tensor]) -> bool:
    """Whether the factors of all outputs (a sequence, or stacked along the first
    dimension) are equal up to round-off (``sqrt(eps)`` of the largest entry of the
    first)."""
    first = factors[0]
    tol = torch.finfo(first.dtype).eps ** 0.5 * float(first.abs().max())
    return all(float((F - first).abs().max()) <= tol for F in factors[1:])


class OutputKron:
    """The KFAC curvatures ``H_1, ..., H_C`` of ``C`` outputs alone, with the factor
    they share kept once (see the module docstring).

    Parameters
    ----------
    kfacs : list[list[torch.Tensor]]
        One entry per parameter tensor, as ``Kron.kfacs``, except that every factor
        that differs between the outputs carries a leading output dimension: a pair
        holds its shared factor (``(n, n)`` or ``(n,)``) at position ``shared[i]``
        and the outputs' factors ``(C, m, m)`` or ``(C, m)`` at the other; a single
        block holds ``(C, n, n)`` or ``(C, n)``.
    shared : list[int or None]
        Per block, the position of the shared factor of a pair; None for a single
        block.
    averaged : list[int or None]
        As ``Kron.averaged`` (which factor ``merge_data_sets`` averages).
    """

    def __init__(
        self,
        kfacs: Sequence[Sequence[Tensor]],
        shared: Sequence[int | None],
        averaged: Sequence[int | None],
    ) -> None:
        self.kfacs = [list(block) for block in kfacs]
        self.shared = list(shared)
        self.averaged = list(averaged)
        if not (len(self.kfacs) == len(self.shared) == len(self.averaged)):
            raise ValueError(
                "kfacs, shared and averaged must have one entry per block; got "
                f"{len(self.kfacs)}, {len(self.shared)} and {len(self.averaged)}."
            )
        outputs = {F.shape[0] for F, _ in self._varying()}
        if len(outputs) > 1:
            raise ValueError(
                "The factors of the outputs must all have the same leading (output) "
                f"dimension; got {sorted(outputs)}."
            )
        # the shared factors' eigenpairs (they do not change with the weights)
        self._shared_pairs: list | None = None

    @classmethod
    def from_columns(cls, columns: Sequence[Kron]) -> OutputKron:
        """Gather the ``Kron`` of each output alone (one layout) into one.

        Raises
        ------
        ValueError
            if the layouts differ, or if some pair has no factor that agrees over
            the outputs (its KFAC is then not linear in the outputs' weights).
        """
        first = columns[0]
        for K in columns[1:]:
            if K._shapes() != first._shapes() or K.averaged != first.averaged:
                raise ValueError(
                    "The Kronecker factors of the outputs have different layouts: "
                    f"{first._shapes()} (averaged {first.averaged}) and "
                    f"{K._shapes()} (averaged {K.averaged})."
                )
        kfacs, shared = [], []
        for i, mean in enumerate(first.averaged):
            factors = [
                [K.kfacs[i][j] for K in columns] for j in range(len(first.kfacs[i]))
            ]
            if len(factors) == 1:
                kfacs.append([torch.stack(factors[0])])
                shared.append(None)
                continue
            prefer = 1 if mean is None else mean  # the input side of [G, A]
            position = next(
                (j for j in (prefer, 1 - prefer) if _agree(factors[j])), None
            )
            if position is None:
                raise ValueError(
                    f"The Kronecker factors of block {i} (shapes "
                    f"{first._shapes()[i]}) differ between the outputs on both "
                    "sides, so its KFAC cannot be split by output. Use "
                    "hessian_structure='full' or 'diag', or a scalar sigma_noise."
                )
            # the shared factor once (a copy: a backend may reuse its tensors)
            block = [
                factors[j][0].clone() if j == position else torch.stack(factors[j])
                for j in range(2)
            ]
            if mean is not None and position != mean:
                # a summed input side counts each input once per column of the
                # output-Hessian factor (the engine's embeddings and (in, out)
                # weights): one for an output alone, C for all outputs together.
                # Moving C across keeps the product and gives the split of all
                # outputs, so that damping sees the factors of the scalar noise.
                C = len(columns)
                block[position] = block[position] * C
                block[1 - position] = block[1 - position] / C
            kfacs.append(block)
            shared.append(position)
        return cls(kfacs, shared, list(first.averaged))

    # -- layout -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.kfacs)

    def _varying(self) -> list[tuple[Tensor, tuple[int, int]]]:
        """``(factor, (block, position))`` of every factor stacked over the outputs."""
        return [
            (F, (i, j))
            for i, block in enumerate(self.kfacs)
            for j, F in enumerate(block)
            if j != self.shared[i]
        ]

    @property
    def n_outputs(self) -> int:
        return self._varying()[0][0].shape[0]

    def _shapes(self) -> list[list[tuple[int, ...]]]:
        return [[tuple(F.shape) for F in block] for block in self.kfacs]

    def block_sizes(self) -> list[int]:
        """Number of parameters of each block (as ``Kron.block_sizes``)."""
        return [math.prod(F.shape[-1] for F in block) for block in self.kfacs]

    # -- the curvature at given weights ----------------------------------------
    def weighted(self, weights: Tensor) -> Kron:
        """The ``Kron`` of ``sum_c weights[c] H_c``: each output's factor weighted and
        summed, the shared ones as they are. Differentiable in ``weights``
        ``(C,)``."""
        blocks = [
            [
                F if j == self.shared[i] else torch.tensordot(weights.to(F), F, dims=1)
                for j, F in enumerate(block)
            ]
            for i, block in enumerate(self.kfacs)
        ]
        return Kron(blocks, self.averaged)

    def shared_eigenpairs(
        self, computed_in: torch.dtype | None = None
    ) -> list[tuple[Tensor | None, Tensor] | None]:
        """Per block, the eigenpair ``(Q, l)`` of the shared factor
        (``Kron.decompose``), None for a single block; computed once."""
        if self._shared_pairs is None:
            pairs: list = [None] * len(self)
            at = [i for i, j in enumerate(self.shared) if j is not None]
            if at:
                K = Kron([[self.kfacs[i][self.shared[i]]] for i in at])
                K = K.decompose(computed_in=computed_in)
                for k, i in enumerate(at):
                    pairs[i] = (K.eigenvectors[k][0], K.eigenvalues[k][0])
            self._shared_pairs = pairs
        return self._shared_pairs

    def decompose(
        self,
        weights: Tensor,
        damping: bool = False,
        computed_in: torch.dtype | None = None,
    ) -> KronDecomposed:
        """Eigendecomposition of ``weighted(weights)``: the shared factors' from
        ``shared_eigenpairs``, the weighted ones by ``Kron.decompose`` (through
        ``torch.linalg.eigh``, differentiable where ``weights`` requires grad and
        the eigenvalues are distinct)."""
        pairs = self.shared_eigenpairs(computed_in)
        known = [
            [pairs[i] if j == self.shared[i] else None for j in range(len(block))]
            for i, block in enumerate(self.kfacs)
        ]
        return self.weighted(weights).decompose(
            damping=damping, known=known, computed_in=computed_in
        )

    # -- accumulation -----------------------------------------------------------
    def add_(self, other: OutputKron) -> OutputKron:
        """Add ``other`` (the next batch) factor by factor, in place; returns self."""
        self._align(other)
        for a, b in zip(self.kfacs, other.kfacs, strict=True):
            for f, g in zip(a, b, strict=True):
                f.add_(g)
        self._shared_pairs = None
        return self

    def merge_data_sets(self, other: OutputKron, n_self: int, n_other: int):
        """The ``OutputKron`` of two disjoint data sets of ``n_self`` and ``n_other``
        data: ``laplace.curvature.kron_assembly.merge_factors`` on every factor
        (each output's as in its own ``Kron``)."""
        self._align(other)
        blocks = merge_factors(self.kfacs, other.kfacs, self.averaged, n_self, n_other)
        return OutputKron(blocks, self.shared, self.averaged)

    def _align(self, other: OutputKron) -> None:
        """Bring ``other`` (or self) to the shared positions of the other, where a
        pair's factors agree over the outputs on both sides in one of them (then
        either may be the shared one); refuse other layouts."""
        if (
            self.averaged != other.averaged
            or self.n_outputs != other.n_outputs
            or [len(b) for b in self.kfacs] != [len(b) for b in other.kfacs]
        ):
            raise ValueError(
                "Cannot combine per-output Kronecker curvatures of different layouts: "
                f"{self._shapes()} (averaged {self.averaged}) and {other._shapes()} "
                f"(averaged {other.averaged})."
            )
        for i, (mine, theirs) in enumerate(zip(self.shared, other.shared)):
            if mine == theirs:
                continue
            if not other._swap(i) and not self._swap(i):
                raise ValueError(
                    f"The factor of block {i} that the outputs share changed sides "
                    "between two batches or data sets; its KFAC cannot be split by "
                    "output. Use hessian_structure='full' or 'diag', or a scalar "
                    "sigma_noise."
                )
        if self._shapes() != other._shapes():
            raise ValueError(
                "Cannot combine per-output Kronecker curvatures of different factor "
                f"shapes: {self._shapes()} and {other._shapes()}."
            )

    def _swap(self, i: int) -> bool:
        """Make the other factor of pair ``i`` the shared one, if its outputs'
        factors agree; returns whether it did."""
        j = self.shared[i]
        block = self.kfacs[i]
        if not _agree(block[1 - j]):
            return False
        C = block[1 - j].shape[0]
        # one of the two sides is the averaged one: the number of outputs moves
        # to the summed side with the shared factor (see from_columns)
        scale = 1 if self.averaged[i] is None else C
        block[j] = (block[j] / scale).expand(C, *block[j].shape).clone()
        block[1 - j] = block[1 - j][0] * scale
        self.shared[i] = 1 - j
        self._shared_pairs = None
        return True

    # -- serialization ------------------------------------------------------------
    def state(self) -> dict:
        """The factors as plain tensors and lists (``OutputKron(**state)`` restores
        them)."""
        return {
            "kfacs": [list(block) for block in self.kfacs],
            "shared": list(self.shared),
            "averaged": list(self.averaged),
        }


__all__ = ["OutputKron"]
