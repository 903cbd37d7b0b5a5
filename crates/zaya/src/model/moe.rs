//! The MoE block (`mlp`): the ZAYA1 router (down-projection, EDA depth state, RMSNorm +
//! 3-layer GELU MLP, softmax over experts + skip, balancing biases for the choice only) and
//! the top-1 SwiGLU experts.

use std::sync::Arc;

use super::linear::{Observed, Weights};
use candle_core::quantized::QTensor;
use candle_core::{DType, Result, Tensor};

use super::linear::Linear;
use crate::config::ZayaConfig;
use crate::kernels;

/// `mlp.gate`.
#[derive(Debug, Clone)]
pub struct ZayaRouter {
    pub(crate) down_proj: Linear,
    /// EDA decay; absent on layer 0.
    router_states_scale: Option<Tensor>,
    norm_weight: Tensor,
    pub(crate) fc1: Linear,
    pub(crate) fc2: Linear,
    pub(crate) out_proj: Linear,
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
            rho = kernels::router_eda(&rho, prev, scale)?;
        }
        let x = kernels::rms_norm(&rho, &self.norm_weight, self.eps)?;
        let x = kernels::gelu_erf(&self.fc1.forward(&x)?)?;
        let x = kernels::gelu_erf(&self.fc2.forward(&x)?)?;
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

/// A LoRA adapter on one stacked expert projection, in PEFT's `target_parameters` layout
/// (`ParamWrapper` over an `[E, out, in]` parameter): `a` is `lora_A.weight` `[E·r, in]`
/// (expert-major rows: expert `e` owns rows `e·r .. (e+1)·r`) and `b` is `lora_B.weight`
/// `[out, r·E]` (rank-major columns: column `k·E + e` is rank `k` of expert `e`). Expert
/// `e` adds `scale · B_e A_e` to its matrix.
#[derive(Debug, Clone)]
pub struct ExpertLowRank {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

impl ExpertLowRank {
    /// Per-expert factors `A` `[E, r, in]` and `B` `[E, out, r]` (differentiable views of
    /// the PEFT-layout tensors).
    pub fn factors(&self, experts: usize) -> Result<(Tensor, Tensor)> {
        let (er, inp) = self.a.dims2()?;
        let out = self.b.dim(0)?;
        let r = er / experts.max(1);
        let a = self.a.reshape((experts, r, inp))?;
        let b = self.b.reshape((out, r, experts))?.permute((2, 0, 1))?;
        Ok((a, b))
    }

    /// `scale · B_e A_e` for every expert, `[E, out, in]` (what merging adds).
    pub fn delta_weight(&self, experts: usize) -> Result<Tensor> {
        let (a, b) = self.factors(experts)?;
        b.contiguous()?.matmul(&a.contiguous()?)? * self.scale
    }
}

/// Adapters of the expert stacks (either or both).
#[derive(Debug, Clone, Default)]
pub struct ExpertAdapters {
    pub gate_up: Option<ExpertLowRank>,
    pub down: Option<ExpertLowRank>,
}

impl ExpertAdapters {
    pub fn is_empty(&self) -> bool {
        self.gate_up.is_none() && self.down.is_none()
    }
}

/// `mlp.experts`: top-1 SwiGLU experts; `gate_up` `[E, 2I, H]` (gate rows first), `down`
/// `[E, H, I]`, each dense or quantized (a row length may fit a block format for one and
/// not the other), plus optional LoRA adapters on either stack.
#[derive(Debug, Clone)]
pub struct ZayaExperts {
    pub gate_up: ExpertMatrices,
    pub down: ExpertMatrices,
    pub adapters: ExpertAdapters,
    /// See each expert's inputs to `gate_up` and `down` (importance-matrix calibration).
    pub observers: Option<(Observed, Observed)>,
    num_experts: usize,
}

impl ZayaExperts {
    pub fn new(cfg: &ZayaConfig, vb: Weights) -> Result<Self> {
        let (e, h, i) = (cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size);
        Ok(ZayaExperts {
            gate_up: ExpertMatrices::load(&vb, (e, 2 * i, h), "gate_up_proj")?,
            down: ExpertMatrices::load(&vb, (e, h, i), "down_proj")?,
            adapters: ExpertAdapters::default(),
            observers: vb.observed("gate_up_proj").zip(vb.observed("down_proj")),
            num_experts: e,
        })
    }

    pub fn num_experts(&self) -> usize {
        self.num_experts
    }

    /// Bytes of all experts' weights.
    pub fn bytes(&self) -> usize {
        self.gate_up.bytes() + self.down.bytes()
    }

    /// `x` `[N, H]`; each token goes to its chosen expert (one matmul per expert over the
    /// gathered tokens) and is scaled by its weight after the down projection. Skipped
    /// tokens produce exactly zero.
    pub fn forward(&self, x: &Tensor, routing: &Routing) -> Result<Tensor> {
        if let Some(observers) = &self.observers {
            self.observe(x, routing, observers)?;
        }
        if !self.adapters.is_empty() {
            return self.forward_adapted(x, routing);
        }
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

impl ZayaExperts {
    /// Hands each expert's inputs to the observers: the tokens routed to it (the input of
    /// `gate_up`) and their SwiGLU activations (the input of `down`, recomputed here from
    /// the base weights, without any LoRA adapter's term; the forward itself runs as
    /// without observers).
    fn observe(
        &self,
        x: &Tensor,
        routing: &Routing,
        (gate_up, down): &(Observed, Observed),
    ) -> Result<()> {
        let (want_gate_up, want_down) = (gate_up.wants(), down.wants());
        if !want_gate_up && !want_down {
            return Ok(());
        }
        for (ex, rows) in self.buckets(routing).iter().enumerate() {
            if rows.is_empty() {
                continue;
            }
            let xs = x.index_select(&Tensor::new(rows.as_slice(), x.device())?, 0)?;
            if want_gate_up {
                gate_up.observe(Some(ex), &xs)?;
            }
            if want_down {
                let hidden = kernels::swiglu(&expert_matmul_t(&xs, &self.gate_up, ex)?)?;
                down.observe(Some(ex), &hidden)?;
            }
        }
        Ok(())
    }

    /// The tokens routed to each expert, in order (skipped tokens are in none).
    fn buckets(&self, routing: &Routing) -> Vec<Vec<u32>> {
        let mut buckets: Vec<Vec<u32>> = vec![Vec::new(); self.num_experts];
        for (tok, &c) in routing.choice.iter().enumerate() {
            if (c as usize) < self.num_experts {
                buckets[c as usize].push(tok as u32);
            }
        }
        buckets
    }

    /// The experts with adapters: tokens grouped per expert as in the kernels, each expert's
    /// frozen matrices read in their stored form (dense in place, or quantized) plus the
    /// expert's low-rank terms, from differentiable ops (gradients reach the adapters, the
    /// routing weights and the input; never the base matrices).
    fn forward_adapted(&self, x: &Tensor, routing: &Routing) -> Result<Tensor> {
        let (n, _) = x.dims2()?;
        let e = self.num_experts;
        let weights = routing.weight.reshape((n, 1))?;
        let buckets = self.buckets(routing);
        let gu_factors = match &self.adapters.gate_up {
            Some(l) => Some((l.factors(e)?, l.scale)),
            None => None,
        };
        let down_factors = match &self.adapters.down {
            Some(l) => Some((l.factors(e)?, l.scale)),
            None => None,
        };
        let mut out = x.zeros_like()?;
        for (ex, rows) in buckets.iter().enumerate() {
            if rows.is_empty() {
                continue;
            }
            let idx = Tensor::new(rows.as_slice(), x.device())?;
            let xs = x.index_select(&idx, 0)?;
            let gu = expert_matmul_t(&xs, &self.gate_up, ex)?;
            let gu = match &gu_factors {
                Some(((a, b), scale)) => expert_low_rank(&gu, &xs, a, b, *scale, ex)?,
                None => gu,
            };
            let hidden = kernels::swiglu(&gu)?;
            let y = expert_matmul_t(&hidden, &self.down, ex)?;
            let y = match &down_factors {
                Some(((a, b), scale)) => expert_low_rank(&y, &hidden, a, b, *scale, ex)?,
                None => y,
            };
            let w = weights.index_select(&idx, 0)?;
            out = out.index_add(&idx, &y.broadcast_mul(&w)?, 0)?;
        }
        Ok(out)
    }
}

/// `y + scale · B_e (A_e x)` in the adapter's dtype, returned in `y`'s dtype.
fn expert_low_rank(
    y: &Tensor,
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    e: usize,
) -> Result<Tensor> {
    let dt = a.dtype();
    let d = (x
        .to_dtype(dt)?
        .matmul(&a.get(e)?.t()?)?
        .matmul(&b.get(e)?.t()?)?
        * scale)?;
    (y.to_dtype(dt)? + d)?.to_dtype(y.dtype())
}

/// `xs · W_eᵀ` for expert `e` of a stack, reading the stored form (bf16 in place through the
/// registry's matmul when nothing records gradients; quantized through candle's kernel).
fn expert_matmul_t(xs: &Tensor, w: &ExpertMatrices, e: usize) -> Result<Tensor> {
    match w {
        ExpertMatrices::Dense(t) => kernels::linear(xs, &t.get(e)?),
        ExpertMatrices::Quantized(qs) => kernels::quantized::qmatmul_t(xs, &qs[e]),
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
