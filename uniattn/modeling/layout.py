"""SuperBlock layout: the seed's three numbers ``G B E`` and the role of every layer.

Layers ``i`` with ``B <= i < E`` take part; among them ``(i - B) % G == 0`` is a
*leader* (computes the attention Softmax) and the rest are *followers* of the
nearest leader below (reuse the leader's probabilities). Everything else is an
ordinary layer. ``E`` may be one past the layer count, as in the seed's
``4 16 33`` for a 32-layer model.

This module is shipped inside saved checkpoints (``trust_remote_code``), so it
imports nothing from the rest of the package.
"""

from __future__ import annotations

from dataclasses import dataclass

ORDINARY, LEADER, FOLLOWER = "ordinary", "leader", "follower"


@dataclass(frozen=True)
class SuperBlockLayout:
    size: int
    begin: int
    end: int
    num_layers: int

    def __post_init__(self):
        g, b, e, n = self.size, self.begin, self.end, self.num_layers
        for name, value in (("size", g), ("begin", b), ("end", e), ("num_layers", n)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"superblock {name} must be an integer, got {value!r}")
        if n < 1:
            raise ValueError(f"the model must have at least one layer, got num_layers={n}")
        if g < 2:
            raise ValueError(
                f"superblock size {g} is too small: a SuperBlock needs a leader and at least one follower, "
                f"so the size G must be >= 2 (the seed uses 4)"
            )
        if b < 0:
            raise ValueError(f"superblock begin {b} is negative: it must be a layer index in [0, {n - 1}]")
        if e > n + 1:
            raise ValueError(
                f"superblock end {e} is past the {n} layers of this model (allowed up to {n + 1}, "
                f"the end is exclusive)"
            )
        if b >= e:
            raise ValueError(f"superblock begin {b} must be smaller than the end {e} (allowed begin: 0 to {e - 1})")
        if not self.followers:
            raise ValueError(
                f"superblock layout G={g} B={b} E={e} on {n} layers has no follower layer: "
                f"the range [{b}, {min(e, n)}) must hold at least one layer after a leader; "
                f"lower B or raise E (up to {n + 1})"
            )

    @classmethod
    def from_config(cls, config) -> "SuperBlockLayout":
        end = config.superblock_end if config.superblock_end is not None else config.num_hidden_layers
        return cls(config.superblock_size, config.superblock_begin, end, config.num_hidden_layers)

    def role(self, i: int) -> str:
        if not 0 <= i < self.num_layers:
            raise IndexError(f"layer {i} is outside the model's {self.num_layers} layers")
        if self.begin <= i < self.end:
            return LEADER if (i - self.begin) % self.size == 0 else FOLLOWER
        return ORDINARY

    def leader_of(self, i: int) -> int:
        """The leader whose Softmax layer ``i`` reuses (``i`` itself for a leader)."""
        if self.role(i) == ORDINARY:
            raise ValueError(f"layer {i} is not inside the SuperBlock range [{self.begin}, {self.end})")
        return i - (i - self.begin) % self.size

    @property
    def roles(self) -> list[str]:
        return [self.role(i) for i in range(self.num_layers)]

    @property
    def leaders(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.role(i) == LEADER]

    @property
    def followers(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.role(i) == FOLLOWER]

    def __str__(self) -> str:
        return f"{self.size} {self.begin} {self.end}"

    def describe(self) -> str:
        groups = [
            f"{lead}<-{','.join(str(f) for f in self.followers if self.leader_of(f) == lead)}"
            for lead in self.leaders
        ]
        return (
            f"SuperBlocks G={self.size} B={self.begin} E={self.end} on {self.num_layers} layers: "
            f"{len(self.leaders)} leaders, {len(self.followers)} followers ({'; '.join(groups)})"
        )
