//! The MoE block (`mlp`): the ZAYA1 router (down-projection, EDA depth state, RMSNorm +
//! 3-layer GELU MLP, softmax over experts + skip, balancing biases for the choice only) and
//! the top-1 SwiGLU experts.

use std::sync::Arc;

use super::linear::Weights;
use candle_core::quantized::QTensor;
use candle_core::{DType, Result, Tensor};

use super::linear::Linear;
use crate::config::ZayaConfig;
use crate::kernels;

/// `mlp.gate`.
#[derive(Debug, Clone)]
pub struct ZayaRouter {
    down_proj: Linear,
    /// EDA decay; absent on layer 0.
    router_states_scale: Option<Tensor>,
    norm_weight: Tensor,
    fc1: Linear,
    fc2: Linear,
    out_proj: Linear,
    /// `[E+1]`, f32; added to the probabilities for the choice only.
    balancing_biases: Tensor,
    balancing_biases_host: Vec<f32>,
    num_experts: usize,
    eps: f64,
}

/// What the router decided for each of the `B·T` tokens.
#[derive(Debug, Clone)]
pub struct Routing {
    /// Raw logits `[B·T, E+1]` (skip class last).
    pub logits: Tensor,
    /// Softmax probabilities `[B·T, E+1]` (differentiable; the aux loss uses them).
    pub probs: Tensor,
    /// Chosen class per token; `E` means the skip class.
    pub choice: Vec<u32>,
    /// The weight of the chosen expert `[B·T, 1]` (0 for skipped tokens).
    pub weight: Tensor,
    /// The pre-norm router state `ρ_out` `[B,T,R]` handed to the next layer.
    pub state: Tensor,
}

impl ZayaRouter {
    /// Bytes of the router's weights.
    pub fn weight_bytes(&self) -> usize {
        let t = super::tensor_bytes;
        self.down_proj.bytes()
            + self.fc1.bytes()
            + self.fc2.bytes()
            + self.out_proj.bytes()
            + self.router_states_scale.as_ref().map_or(0, t)
            + t(&self.norm_weight)
            + t(&self.balancing_biases)
    }

    pub fn new(cfg: &ZayaConfig, layer_idx: usize, vb: Weights) -> Result<Self> {
        let h = cfg.hidden_size;
        let r = cfg.router_hidden_size;
        let e = cfg.num_experts;
        let mlp = vb.pp("router_mlp");
        let balancing_biases = vb.get_with_hints_dtype(
            e + 1,
            "balancing_biases",
            candle_nn::Init::Const(0.),
            DType::F32,
        )?;
        let balancing_biases = balancing_biases.detach();
        Ok(ZayaRouter {
            down_proj: Linear::new(h, r, true, vb.pp("down_proj"))?,
            router_states_scale: if layer_idx > 0 {
                Some(vb.get(r, "router_states_scale")?)
            } else {
                None
            },
            norm_weight: mlp.pp("norm").get(r, "weight")?,
            fc1: Linear::new(r, r, true, mlp.pp("fc1"))?,
            fc2: Linear::new(r, r, true, mlp.pp("fc2"))?,
            out_proj: Linear::new(r, e + 1, false, mlp.pp("out_proj"))?,
            balancing_biases_host: balancing_biases.to_vec1()?,
            balancing_biases,
            num_experts: e,
            eps: cfg.rms_norm_eps,
        })
    }

    pub fn balancing_biases(&self) -> &Tensor {
        &self.balancing_biases
    }

    /// `n` is the post-attention-normed hidden `[B,T,H]`, `state` the previous layer's `ρ`.
    pub fn forward(&self, n: &Tensor, state: Option<&Tensor>) -> Result<Routing> {
        let mut rho = self.down_proj.forward(n)?;
        if let (Some(scale), Some(prev)) = (&self.router_states_scale, state) {
            rho = (rho + prev.broadcast_mul(scale)?)?;
        }
        let x = kernels::rms_norm(&rho, &self.norm_weight, self.eps)?;
        let x = self.fc1.forward(&x)?.gelu_erf()?;
        let x = self.fc2.forward(&x)?.gelu_erf()?;
        let logits = self.out_proj.forward(&x)?;
        let classes = self.num_experts + 1;
        let logits = logits.reshape(((), classes))?;
        let probs = kernels::softmax(&logits)?;

        // Top-1 on f32(probs) + biases; first maximum wins on exact ties.
        let host: Vec<Vec<f32>> = probs.to_dtype(DType::F32)?.to_vec2()?;
        let choice: Vec<u32> = host
            .iter()
            .map(|row| {
                let mut best = 0usize;
                let mut best_v = f32::NEG_INFINITY;
                for (e, (p, bias)) in row.iter().zip(&self.balancing_biases_host).enumerate() {
                    let v = p + bias;
                    if v > best_v {
                        best_v = v;
                        best = e;
                    }
                }
                best as u32
            })
            .collect();
        let idx = Tensor::from_iter(choice.iter().copied(), probs.device())?.unsqueeze(1)?;
        let gathered = probs.gather(&idx, 1)?;
        let keep: Vec<f32> = choice
            .iter()
            .map(|&c| {
                if c as usize == self.num_experts {
                    0.0
                } else {
                    1.0
                }
            })
            .collect();
        let keep =
            Tensor::from_vec(keep, (choice.len(), 1), probs.device())?.to_dtype(probs.dtype())?;
        let weight = gathered.mul(&keep)?;
        Ok(Routing {
            logits,
            probs,
            choice,
            weight,
            state: rho,
        })
    }
}

/// One projection of all experts, in any of the forms the MoE kernels read.
#[derive(Debug, Clone)]
pub enum ExpertMatrices {
    /// Stacked `[E, R, C]` in the stored dtype.
    Dense(Tensor),
    /// One block-quantized `[R, C]` matrix per expert.
    Quantized(Vec<Arc<QTensor>>),
}

impl ExpertMatrices {
    fn load(vb: &Weights, shape: (usize, usize, usize), name: &str) -> Result<Self> {
        Ok(match vb.quantized(shape, name)? {
            Some(q) => ExpertMatrices::Quantized(split(&q)?),
            None => ExpertMatrices::Dense(vb.get(shape, name)?),
        })
    }

    /// Bytes of all experts' matrices.
    pub fn bytes(&self) -> usize {
        match self {
            ExpertMatrices::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            ExpertMatrices::Quantized(qs) => qs.iter().map(|q| q.storage_size_in_bytes()).sum(),
        }
    }

    /// Bytes of one expert's matrix (what a token routed to it reads).
    pub fn bytes_per_expert(&self) -> usize {
        match self {
            ExpertMatrices::Dense(t) => self.bytes() / t.dim(0).unwrap_or(1).max(1),
            ExpertMatrices::Quantized(qs) => self.bytes() / qs.len().max(1),
        }
    }
}

/// `mlp.experts`: top-1 SwiGLU experts; `gate_up` `[E, 2I, H]` (gate rows first), `down`
/// `[E, H, I]`, each dense or quantized (a row length may fit a block format for one and
/// not the other).
#[derive(Debug, Clone)]
pub struct ZayaExperts {
    pub gate_up: ExpertMatrices,
    pub down: ExpertMatrices,
    num_experts: usize,
}

impl ZayaExperts {
    pub fn new(cfg: &ZayaConfig, vb: Weights) -> Result<Self> {
        let (e, h, i) = (cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size);
        Ok(ZayaExperts {
            gate_up: ExpertMatrices::load(&vb, (e, 2 * i, h), "gate_up_proj")?,
            down: ExpertMatrices::load(&vb, (e, h, i), "down_proj")?,
            num_experts: e,
        })
    }

    /// Bytes of all experts' weights.
    pub fn bytes(&self) -> usize {
        self.gate_up.bytes() + self.down.bytes()
    }

    /// `x` `[N, H]`; each token goes to its chosen expert (one matmul per expert over the
    /// gathered tokens) and is scaled by its weight after the down projection. Skipped
    /// tokens produce exactly zero.
    pub fn forward(&self, x: &Tensor, routing: &Routing) -> Result<Tensor> {
        match (&self.gate_up, &self.down) {
            // The registry's grouped expert kernel (skip-class ids give zero rows).
            (ExpertMatrices::Dense(gate_up), ExpertMatrices::Dense(down)) => {
                kernels::moe_experts(x, &routing.choice, &routing.weight, gate_up, down)
            }
            (gate_up, down) => {
                kernels::quantized::moe_experts(x, &routing.choice, &routing.weight, gate_up, down)
            }
        }
    }
}

fn split(q: &QTensor) -> Result<Vec<Arc<QTensor>>> {
    crate::quant::split_experts(q).map_err(|e| candle_core::Error::Msg(e.to_string()))
}

/// What a token routed to the skip class contributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SkipBehaviour {
    /// transformers 5.23 and upstream vLLM: exactly zero (the parity target).
    #[default]
    Zero,
    /// Zyphra's legacy fork and vLLM fork: the MoE input scaled by the skip probability,
    /// `π_skip · n`.
    ScaledInput,
}

/// `mlp`: router + experts.
#[derive(Debug, Clone)]
pub struct ZayaMoe {
    pub gate: ZayaRouter,
    pub experts: ZayaExperts,
    pub skip: SkipBehaviour,
}

impl ZayaMoe {
    /// Bytes of the router and experts; with `one_expert`, one expert's matrices only.
    pub fn weight_bytes(&self, one_expert: bool) -> usize {
        let experts = if one_expert {
            self.experts.gate_up.bytes_per_expert() + self.experts.down.bytes_per_expert()
        } else {
            self.experts.bytes()
        };
        self.gate.weight_bytes() + experts
    }

    pub fn new(cfg: &ZayaConfig, layer_idx: usize, vb: Weights) -> Result<Self> {
        Ok(ZayaMoe {
            gate: ZayaRouter::new(cfg, layer_idx, vb.pp("gate"))?,
            experts: ZayaExperts::new(cfg, vb.pp("experts"))?,
            skip: SkipBehaviour::Zero,
        })
    }

    /// Returns the MoE output `[B,T,H]` and the routing (whose `state` feeds the next layer).
    pub fn forward(&self, n: &Tensor, state: Option<&Tensor>) -> Result<(Tensor, Routing)> {
        let (b, t, h) = n.dims3()?;
        let routing = self.gate.forward(n, state)?;
        let flat = n.reshape((b * t, h))?;
        let mut out = self.experts.forward(&flat, &routing)?;
        if self.skip == SkipBehaviour::ScaledInput {
            let e = self.experts.num_experts;
            let skipped: Vec<f32> = routing
                .choice
                .iter()
                .map(|&c| if c as usize == e { 1.0 } else { 0.0 })
                .collect();
            let skipped = Tensor::from_vec(skipped, (b * t, 1), n.device())?
                .to_dtype(routing.probs.dtype())?;
            let weight = routing.probs.narrow(1, e, 1)?.mul(&skipped)?;
            out = (out + flat.broadcast_mul(&weight)?)?;
        }
        Ok((out.reshape((b, t, h))?, routing))
    }
}
