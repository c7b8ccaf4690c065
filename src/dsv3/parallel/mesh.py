"""The one DeviceMesh of a training job (spec 5: V3 trains with PP16 x EP64 x ZeRO-1 data parallelism): dimensions
("pp", "dp", "ep"), global rank = (p * dp + d) * ep + e, the ep ranks of one (pipeline position, dp row) adjacent
(one node: the expert all-to-all stays on NVLink), as torchtitan lays out its world mesh.

  * "ep": the ranks that hold the routed experts between them (rank (p, d, e) holds experts [e E/ep, (e+1) E/ep));
  * "dp": the replicas of the same expert slice (same p and e), i.e. an expert's data-parallel column;
  * "pp": the pipeline through this rank (same d and e), DualPipeV's process group;
  * `position`: the dp * ep ranks of one pipeline position, flattened, which replicate every non-expert parameter
    (and the FSDP mesh of those parameters: the whole world when pp = 1).
One process (no process group) has no mesh: every function taking one treats None as the world of one rank.
"""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

DIMS = ("pp", "dp", "ep")


class ParallelMesh:
    """This rank's place in the (pp, dp, ep) DeviceMesh and the process groups the layouts use."""

    def __init__(self, pp: int, dp: int, ep: int, device_type: str | None = None, overlap: bool = False):
        """Every rank of the default group must build it at the same point (groups are created collectively).
        overlap: also create a second group over each ep row for DualPipe's overlapped backward (parallel.overlap)."""
        world = dist.get_world_size()
        if pp * dp * ep != world:
            raise ValueError(f"a (pp {pp}, dp {dp}, ep {ep}) mesh needs {pp * dp * ep} ranks, the world has {world}")
        if device_type is None:
            device_type = "cuda" if "nccl" in str(dist.get_backend()) else "cpu"
        self.pp, self.dp, self.ep = pp, dp, ep
        self.device_mesh: DeviceMesh = init_device_mesh(device_type, (pp, dp, ep), mesh_dim_names=DIMS)
        self.pp_rank, self.dp_rank, self.ep_rank = self.device_mesh.get_coordinate()
        self.pp_group = self.device_mesh.get_group("pp")
        self.dp_group = self.device_mesh.get_group("dp")
        self.ep_group = self.device_mesh.get_group("ep")
        # torchtitan's way to a 1-D mesh over several dimensions (DeviceMesh has no public flatten yet)
        self.position: DeviceMesh = self.device_mesh["dp", "ep"]._flatten("position")
        self.position_group = self.position.get_group()
        self.ep_group_bwd = None
        if overlap:
            n = dp * ep
            rows = [dist.new_group([p * n + d * ep + e for e in range(ep)]) for p in range(pp) for d in range(dp)]
            self.ep_group_bwd = rows[self.pp_rank * dp + self.dp_rank]

    @property
    def replicas(self) -> int:
        """Ranks that share a pipeline position's batch: dp * ep."""
        return self.dp * self.ep

    @property
    def share(self) -> int:
        """This rank's index among them: which rows of every micro-batch it feeds."""
        return self.dp_rank * self.ep + self.ep_rank

    def __getitem__(self, dims):
        return self.device_mesh[dims]
