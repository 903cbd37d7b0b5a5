//! The rank mesh: `world = dp × pp × ep × tp`, tensor parallelism innermost (neighbouring
//! ranks share a TP group, as in Megatron-LM), and one sub-communicator per axis.

use crate::comm::{Comm, DistError, DistResult};

/// Most ranks a mesh may have (far beyond any run; keeps every product of the degrees
/// inside `usize`).
pub const MAX_WORLD: usize = 1 << 20;

/// Degrees of each kind of parallelism.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MeshShape {
    pub tp: usize,
    pub pp: usize,
    pub ep: usize,
    pub dp: usize,
}

impl Default for MeshShape {
    fn default() -> Self {
        MeshShape {
            tp: 1,
            pp: 1,
            ep: 1,
            dp: 1,
        }
    }
}

/// Where one rank sits in the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Coords {
    pub tp: usize,
    pub pp: usize,
    pub ep: usize,
    pub dp: usize,
}

impl MeshShape {
    pub fn new(tp: usize, pp: usize, ep: usize, dp: usize) -> DistResult<Self> {
        for (name, v) in [("tp", tp), ("pp", pp), ("ep", ep), ("dp", dp)] {
            if v == 0 {
                return Err(DistError::Invalid {
                    rank: 0,
                    op: "mesh",
                    message: format!("--{name} must be at least 1"),
                });
            }
        }
        // checked: `--tp 4294967296 --pp 4294967296` must be an error, not an overflow
        if [tp, pp, ep, dp]
            .iter()
            .try_fold(1usize, |acc, &v| acc.checked_mul(v))
            .is_none_or(|w| w > MAX_WORLD)
        {
            return Err(DistError::Invalid {
                rank: 0,
                op: "mesh",
                message: format!(
                    "--tp {tp} --pp {pp} --ep {ep} --dp {dp} is more than {MAX_WORLD} ranks"
                ),
            });
        }
        Ok(MeshShape { tp, pp, ep, dp })
    }

    pub fn world(&self) -> usize {
        self.tp * self.pp * self.ep * self.dp
    }

    pub fn is_single(&self) -> bool {
        self.world() == 1
    }

    /// Fails unless `world` processes are exactly what the mesh needs.
    pub fn check_world(&self, world: usize) -> DistResult<()> {
        if world != self.world() {
            return Err(DistError::Invalid {
                rank: 0,
                op: "mesh",
                message: format!(
                    "{world} ranks were started but --tp {} --pp {} --ep {} --dp {} needs {}",
                    self.tp,
                    self.pp,
                    self.ep,
                    self.dp,
                    self.world()
                ),
            });
        }
        Ok(())
    }

    pub fn coords(&self, rank: usize) -> Coords {
        let tp = rank % self.tp;
        let rest = rank / self.tp;
        let ep = rest % self.ep;
        let rest = rest / self.ep;
        let pp = rest % self.pp;
        let dp = rest / self.pp;
        Coords { tp, pp, ep, dp }
    }

    pub fn rank_of(&self, c: Coords) -> usize {
        ((c.dp * self.pp + c.pp) * self.ep + c.ep) * self.tp + c.tp
    }

    /// `tp2-pp2`-style label of the non-trivial axes (`single` when all are 1).
    pub fn label(&self) -> String {
        let parts: Vec<String> = [
            ("tp", self.tp),
            ("pp", self.pp),
            ("ep", self.ep),
            ("dp", self.dp),
        ]
        .iter()
        .filter(|(_, v)| *v > 1)
        .map(|(n, v)| format!("{n}{v}"))
        .collect();
        if parts.is_empty() {
            "single".into()
        } else {
            parts.join("-")
        }
    }
}

/// A rank's communicators: the world and one group per mesh axis.
pub struct Mesh {
    pub shape: MeshShape,
    pub coords: Coords,
    pub world: Box<dyn Comm>,
    /// Ranks that differ only in their TP coordinate.
    pub tp: Box<dyn Comm>,
    pub pp: Box<dyn Comm>,
    pub ep: Box<dyn Comm>,
    pub dp: Box<dyn Comm>,
}

impl Mesh {
    /// Collective over `world`: checks its size against `shape` and splits the axis groups.
    pub fn new(world: Box<dyn Comm>, shape: MeshShape) -> DistResult<Self> {
        shape.check_world(world.size()).map_err(|e| match e {
            DistError::Invalid { op, message, .. } => DistError::Invalid {
                rank: world.world_rank(),
                op,
                message,
            },
            other => other,
        })?;
        let c = shape.coords(world.rank());
        // color = the rank with this axis' coordinate zeroed; key = the axis coordinate
        let color = |zeroed: Coords| shape.rank_of(zeroed);
        let tp = world.split(color(Coords { tp: 0, ..c }), c.tp)?;
        let pp = world.split(color(Coords { pp: 0, ..c }), c.pp)?;
        let ep = world.split(color(Coords { ep: 0, ..c }), c.ep)?;
        let dp = world.split(color(Coords { dp: 0, ..c }), c.dp)?;
        Ok(Mesh {
            shape,
            coords: c,
            world,
            tp,
            pp,
            ep,
            dp,
        })
    }
}
