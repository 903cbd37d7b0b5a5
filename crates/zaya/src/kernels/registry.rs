//! Run-time kernel dispatch. Every kernel has a reference implementation (differentiable
//! candle ops, always available) and zero or more fast ones. What each implementation can
//! do is declared as data ([`KERNELS`]); the dispatcher in `kernels/mod.rs` asks
//! [`select`] which one to run for a call's device, dtype and shape.
//!
//! Overrides, strongest first:
//! 1. [`with_choice`]: scoped to the current thread and closure (tests, A/B checks);
//! 2. [`set_override`] / [`set_global_override`]: process-wide, from code;
//! 3. `ZAYA_KERNEL_<NAME>=reference|fast|auto|<impl>` (NAME uppercased, e.g.
//!    `ZAYA_KERNEL_RMS_NORM`), then `ZAYA_KERNELS=reference|fast|auto`: read on first use
//!    (and again after [`reload_env`]).
//!
//! `fast` (= `auto`) picks the first fast implementation that is available in this build
//! and supports the call, else the reference. A named implementation that does not support
//! a particular call (dtype, shape, device) also falls back to the reference for that call;
//! naming one that is not built in at all is an error.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::RwLock;

use candle_core::{DType, Device, Shape};

use super::cpu;
use super::KernelError;

/// The kernels with a run-time choice of implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kernel {
    RmsNorm,
    Rotary,
    Swiglu,
    BiasSwiglu,
    Softmax,
    CcaConv,
    MoeExperts,
    Matmul,
    ResidualScale,
    CcaQkNorm,
    GeluErf,
    RouterEda,
    LogProbGather,
    BiasAdd,
    LossHead,
}

impl Kernel {
    pub const ALL: [Kernel; 15] = [
        Kernel::RmsNorm,
        Kernel::Rotary,
        Kernel::Swiglu,
        Kernel::BiasSwiglu,
        Kernel::Softmax,
        Kernel::CcaConv,
        Kernel::MoeExperts,
        Kernel::Matmul,
        Kernel::ResidualScale,
        Kernel::CcaQkNorm,
        Kernel::GeluErf,
        Kernel::RouterEda,
        Kernel::LogProbGather,
        Kernel::BiasAdd,
        Kernel::LossHead,
    ];

    /// The kernel's name (lower snake case, as in `ZAYA_KERNEL_<NAME>` uppercased).
    pub fn name(self) -> &'static str {
        self.info().name
    }

    pub fn from_name(name: &str) -> Option<Kernel> {
        let name = name.trim().to_ascii_lowercase();
        Kernel::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The capability table entry of this kernel.
    pub fn info(self) -> &'static KernelInfo {
        // KERNELS is in `Kernel::ALL` order (checked by a unit test).
        &KERNELS[self as usize]
    }

    fn env_var(self) -> String {
        format!("ZAYA_KERNEL_{}", self.name().to_ascii_uppercase())
    }
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Identifies an implementation; the dispatcher matches on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImplId {
    /// Differentiable candle ops (the definition).
    Reference,
    /// Fused multi-threaded CPU code (a candle `CustomOp` with a backward).
    Fused,
    /// The system BLAS (`blas` cargo feature).
    Blas,
}

impl ImplId {
    pub fn name(self) -> &'static str {
        match self {
            ImplId::Reference => "reference",
            ImplId::Fused => "fused",
            ImplId::Blas => "blas",
        }
    }
}

/// One implementation of a kernel and what it can run.
pub struct ImplInfo {
    pub id: ImplId,
    pub summary: &'static str,
    /// Whether this build on this machine has it (cargo features, system libraries).
    pub available: fn() -> bool,
    /// Whether it handles a call on this device with this dtype and (main operand) shape.
    pub supports: fn(&Device, DType, &Shape) -> bool,
}

impl ImplInfo {
    pub fn name(&self) -> &'static str {
        self.id.name()
    }
}

/// A kernel's capability table entry.
pub struct KernelInfo {
    pub kernel: Kernel,
    pub name: &'static str,
    pub summary: &'static str,
    pub reference: ImplInfo,
    /// Fast implementations, in order of preference.
    pub fast: &'static [ImplInfo],
    /// A typical main-operand shape, used by [`describe`] to show what would be selected.
    pub example_shape: &'static [usize],
}

impl KernelInfo {
    fn implementations(&self) -> impl Iterator<Item = &ImplInfo> {
        std::iter::once(&self.reference).chain(self.fast.iter())
    }
}

fn always() -> bool {
    true
}

fn any_call(_: &Device, _: DType, _: &Shape) -> bool {
    true
}

fn cpu_float(dev: &Device, dtype: DType) -> bool {
    dev.is_cpu() && cpu::is_kernel_float(dtype)
}

fn cpu_float_nonempty(dev: &Device, dtype: DType, shape: &Shape) -> bool {
    cpu_float(dev, dtype) && shape.rank() >= 1 && shape.elem_count() > 0
}

fn cpu_float_even_last(dev: &Device, dtype: DType, shape: &Shape) -> bool {
    cpu_float(dev, dtype)
        && shape
            .dims()
            .last()
            .is_some_and(|&d| d > 0 && d.is_multiple_of(2))
}

fn cpu_float_rank(dev: &Device, dtype: DType, shape: &Shape, rank: usize) -> bool {
    cpu_float(dev, dtype) && shape.rank() == rank
}

const fn reference(summary: &'static str) -> ImplInfo {
    ImplInfo {
        id: ImplId::Reference,
        summary,
        available: always,
        supports: any_call,
    }
}

/// The capability table, in [`Kernel::ALL`] order.
pub static KERNELS: [KernelInfo; 15] = [
    KernelInfo {
        kernel: Kernel::RmsNorm,
        name: "rms_norm",
        summary: "w * cast_back(x / sqrt(mean(x^2) + eps)), statistics in f32",
        reference: reference("candle ops in f32"),
        fast: &[ImplInfo {
            id: ImplId::Fused,
            summary: "one pass per row, threaded; fused backward",
            available: always,
            supports: cpu_float_nonempty,
        }],
        example_shape: &[1, 512, 2048],
    },
    KernelInfo {
        kernel: Kernel::Rotary,
        name: "rotary",
        summary: "partial rotate-half RoPE on [B, heads, T, D]",
        reference: reference("narrow/cat/mul candle ops"),
        fast: &[ImplInfo {
            id: ImplId::Fused,
            summary: "in-register pair rotation, threaded; fused backward",
            available: always,
            supports: |d, t, s| cpu_float_rank(d, t, s, 4),
        }],
        example_shape: &[1, 8, 512, 128],
    },
    KernelInfo {
        kernel: Kernel::Swiglu,
        name: "swiglu",
        summary: "silu(gate) * up on a fused [.., 2I] projection",
        reference: reference("narrow + silu + mul"),
        fast: &[ImplInfo {
            id: ImplId::Fused,
            summary: "single pass, vectorised exp; fused backward",
            available: always,
            supports: cpu_float_even_last,
        }],
        example_shape: &[512, 4096],
    },
    KernelInfo {
        kernel: Kernel::BiasSwiglu,
        name: "bias_swiglu",
        summary: "swiglu(gate_up + bias)",
        reference: reference("broadcast_add + swiglu"),
        fast: &[ImplInfo {
            id: ImplId::Fused,
            summary: "bias, activation and product in one pass; fused backward",
            available: always,
            supports: cpu_float_even_last,
        }],
        example_shape: &[512, 4096],
    },
    KernelInfo {
        kernel: Kernel::Softmax,
        name: "softmax",
        summary: "softmax over the last axis in f32, rounded once to the input dtype",
        reference: reference("max/exp/sum/div candle ops in f32"),
        fast: &[ImplInfo {
            id: ImplId::Fused,
            summary: "one pass per row, vectorised exp; fused backward",
            available: always,
            supports: cpu_float_nonempty,
        }],
        example_shape: &[8, 512, 512],
    },
    KernelInfo {
        kernel: Kernel::CcaConv,
        name: "cca_conv",
        summary: "CCA depthwise + grouped causal convolutions over [B, S+T, C]",
        reference: reference("shift-multiply + batched matmul candle ops"),
        fast: &[ImplInfo {
            id: ImplId::Fused,
            summary: "fused taps, per-group gemm on strided views; fused backward",
            available: always,
            supports: |d, t, s| cpu_float_rank(d, t, s, 3),
        }],
        example_shape: &[1, 514, 1280],
    },
    KernelInfo {
        kernel: Kernel::MoeExperts,
        name: "moe_experts",
        summary: "top-1 SwiGLU experts: grouped gate_up/down matmuls, weighted scatter",
        reference: reference("per-expert index_select/matmul/index_add"),
        fast: &[ImplInfo {
            id: ImplId::Fused,
            summary:
                "bucketed rows, gemm per expert, fused swiglu, no per-expert copies of the output",
            available: always,
            supports: |d, t, s| cpu_float_rank(d, t, s, 2),
        }],
        example_shape: &[512, 2048],
    },
    KernelInfo {
        kernel: Kernel::Matmul,
        name: "matmul",
        summary: "matrix product for linear layers",
        reference: reference("candle matmul (pure-Rust gemm)"),
        fast: &[
            ImplInfo {
                id: ImplId::Blas,
                summary: "system OpenBLAS sgemm for f32 2-D operands (cargo feature `blas`)",
                available: super::matmul::blas_available,
                supports: |d, t, s| d.is_cpu() && t == DType::F32 && s.rank() == 2,
            },
            ImplInfo {
                id: ImplId::Fused,
                summary: "bf16 weights read in place (GEMV <= 32 rows, tiled GEMM above, f32 \
                          accumulation; inference only); f32: threaded GEMV for <= 32 rows, \
                          zaya's AVX-512 GEMM reading W in place above (else the gemm crate \
                          into unfilled outputs), backward writing dW in the weight's layout",
                available: always,
                // `t` is the weight's dtype.
                supports: |d, t, s| {
                    d.is_cpu() && s.rank() == 2 && (t == DType::BF16 || t == DType::F32)
                },
            },
        ],
        example_shape: &[512, 2048],
    },
    KernelInfo {
        kernel: Kernel::ResidualScale,
        name: "residual_scale",
        summary: "f32((sub + b_h) * s_h) + (res + b_r) * s_r, the decoder's residual merges",
        reference: reference("broadcast add/mul candle ops"),
        fast: &[ImplInfo {
            id: ImplId::Fused,
            summary: "one pass per row; fused backward with the parameter row sums",
            available: always,
            supports: cpu_float_nonempty,
        }],
        example_shape: &[1, 512, 2048],
    },
    KernelInfo {
        kernel: Kernel::CcaQkNorm,
        name: "cca_qk_norm",
        summary: "CCA q/k mean residuals + L2 norm to sqrt(D) + key temp over [B, T, C]",
        reference: reference("reshape/broadcast/mean/sqr/sum candle ops"),
        fast: &[ImplInfo {
            id: ImplId::Fused,
            summary: "one pass per token, heads recomputed in the fused backward; bf16: the \
                      reference's per-op rounding reproduced bit for bit, forward only (a bf16 \
                      call recording gradients runs the reference); f16: the reference",
            available: always,
            supports: |d, t, s| {
                d.is_cpu()
                    && matches!(t, DType::F32 | DType::BF16)
                    && s.rank() == 3
                    && s.elem_count() > 0
            },
        }],
        example_shape: &[1, 512, 1280],
    },
    KernelInfo {
        kernel: Kernel::GeluErf,
        name: "gelu_erf",
        summary: "exact GELU 0.5 x (1 + erf(x / sqrt 2)), the router MLP's activation",
        reference: reference("candle gelu_erf (a dozen ops in its backward)"),
        fast: &[ImplInfo {
            id: ImplId::Fused,
            summary: "one pass forward, one pass backward",
            available: always,
            supports: cpu_float_nonempty,
        }],
        example_shape: &[512, 256],
    },
    KernelInfo {
        kernel: Kernel::RouterEda,
        name: "router_eda",
        summary: "the router's EDA step state + prev * router_states_scale",
        reference: reference("broadcast_mul + add candle ops"),
        fast: &[ImplInfo {
            id: ImplId::Fused,
            summary: "one pass per row; fused backward with the scale's row sum",
            available: always,
            supports: cpu_float_nonempty,
        }],
        example_shape: &[1, 512, 256],
    },
    KernelInfo {
        kernel: Kernel::LogProbGather,
        name: "log_prob_gather",
        summary: "log_softmax(logits)[n, id_n] over [rows, vocab]: the loss head's term",
        reference: reference("max/sub/exp/sum/log/sub/gather candle ops"),
        fast: &[ImplInfo {
            id: ImplId::Fused,
            summary: "one pass per row each way, vectorised exp; fused backward",
            available: always,
            supports: |d, t, s| cpu_float_rank(d, t, s, 2) && s.elem_count() > 0,
        }],
        example_shape: &[512, 32000],
    },
    KernelInfo {
        kernel: Kernel::BiasAdd,
        name: "bias_add",
        summary: "y + bias over the last axis (the linear layers' bias)",
        reference: reference("candle broadcast_add"),
        fast: &[ImplInfo {
            id: ImplId::Fused,
            summary: "one pass on the kernel pool; backward row sum in one pass",
            available: always,
            supports: cpu_float_nonempty,
        }],
        example_shape: &[512, 128],
    },
    KernelInfo {
        kernel: Kernel::LossHead,
        name: "loss_head",
        summary: "the training LM head: logits, log_softmax(..)[target] and their backward \
                  to the rows, weight and bias, a chunk of rows at a time",
        reference: reference("candle matmul + log_prob_gather + autograd, per chunk"),
        fast: &[ImplInfo {
            id: ImplId::Fused,
            summary: "one reused logits buffer, gradient in place, weight gradient \
                      summed by the GEMM in [vocab x hidden] order (f32)",
            available: always,
            supports: |d, t, s| d.is_cpu() && t == DType::F32 && s.rank() == 2,
        }],
        example_shape: &[32000, 512],
    },
];

/// How to pick a kernel's implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// The first fast implementation that supports the call, else the reference.
    Auto,
    /// Always the reference.
    Reference,
    /// A named implementation where it supports the call, else the reference.
    Impl(ImplId),
}

impl Choice {
    /// Parses `auto`, `fast`, `reference` (or `ref`) or an implementation name.
    pub fn parse(s: &str) -> Option<Choice> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "fast" | "default" => Some(Choice::Auto),
            "reference" | "ref" => Some(Choice::Reference),
            "fused" => Some(Choice::Impl(ImplId::Fused)),
            "blas" => Some(Choice::Impl(ImplId::Blas)),
            _ => None,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Choice::Auto => "auto",
            Choice::Reference => "reference",
            Choice::Impl(id) => id.name(),
        }
    }
}

/// Checks that `choice` names something `kernel` has in this build.
fn validate(kernel: Kernel, choice: Choice) -> Result<(), KernelError> {
    if let Choice::Impl(id) = choice {
        let info = kernel.info();
        match info.implementations().find(|i| i.id == id) {
            None => {
                return Err(KernelError::UnknownImpl {
                    kernel: kernel.name(),
                    value: id.name().to_string(),
                    known: known_impls(kernel),
                })
            }
            Some(i) if !(i.available)() => {
                return Err(KernelError::ImplUnavailable {
                    kernel: kernel.name(),
                    implementation: id.name(),
                })
            }
            Some(_) => {}
        }
    }
    Ok(())
}

fn known_impls(kernel: Kernel) -> String {
    let mut names = vec!["auto", "fast", "reference"];
    names.extend(kernel.info().fast.iter().map(|i| i.name()));
    names.join(", ")
}

#[derive(Default, Clone)]
struct Overrides {
    all: Option<Choice>,
    per_kernel: BTreeMap<Kernel, Choice>,
}

impl Overrides {
    fn get(&self, kernel: Kernel) -> Option<Choice> {
        self.per_kernel.get(&kernel).copied().or(self.all)
    }
}

#[derive(Default)]
struct State {
    programmatic: Overrides,
    /// `None` until the environment is read.
    env: Option<Result<Overrides, KernelError>>,
}

static STATE: RwLock<State> = RwLock::new(State {
    programmatic: Overrides {
        all: None,
        per_kernel: BTreeMap::new(),
    },
    env: None,
});

thread_local! {
    static SCOPED: RefCell<Vec<(Option<Kernel>, Choice)>> = const { RefCell::new(Vec::new()) };
}

/// Reads the overrides from an iterator of environment variables (pure, for tests).
pub fn overrides_from_vars<I, K, V>(vars: I) -> Result<Vec<(Option<Kernel>, Choice)>, KernelError>
where
    I: IntoIterator<Item = (K, V)>,
    K: AsRef<str>,
    V: AsRef<str>,
{
    let mut out = Vec::new();
    for (key, value) in vars {
        let (key, value) = (key.as_ref(), value.as_ref());
        if key == "ZAYA_KERNELS" {
            let choice = Choice::parse(value).filter(|c| !matches!(c, Choice::Impl(_)));
            let choice = choice.ok_or_else(|| KernelError::BadEnv {
                var: key.to_string(),
                value: value.to_string(),
                message: "expected reference, fast or auto".to_string(),
            })?;
            out.push((None, choice));
        } else if let Some(name) = key.strip_prefix("ZAYA_KERNEL_") {
            let kernel = Kernel::from_name(name).ok_or_else(|| KernelError::BadEnv {
                var: key.to_string(),
                value: value.to_string(),
                message: format!(
                    "no kernel named `{}` (known: {})",
                    name.to_ascii_lowercase(),
                    Kernel::ALL.map(|k| k.name()).join(", ")
                ),
            })?;
            let bad = |message: String| KernelError::BadEnv {
                var: key.to_string(),
                value: value.to_string(),
                message,
            };
            let choice = Choice::parse(value)
                .ok_or_else(|| bad(format!("expected one of {}", known_impls(kernel))))?;
            validate(kernel, choice).map_err(|e| bad(e.to_string()))?;
            out.push((Some(kernel), choice));
        }
    }
    Ok(out)
}

fn read_env() -> Result<Overrides, KernelError> {
    let vars = std::env::vars_os().filter_map(|(k, v)| {
        let k = k.into_string().ok()?;
        (k == "ZAYA_KERNELS" || k.starts_with("ZAYA_KERNEL_"))
            .then(|| (k, v.to_string_lossy().into_owned()))
    });
    let mut ov = Overrides::default();
    for (kernel, choice) in overrides_from_vars(vars)? {
        match kernel {
            Some(k) => {
                ov.per_kernel.insert(k, choice);
            }
            None => ov.all = Some(choice),
        }
    }
    Ok(ov)
}

fn with_state<R>(f: impl FnOnce(&State) -> R) -> R {
    {
        let st = STATE.read().unwrap_or_else(|e| e.into_inner());
        if st.env.is_some() {
            return f(&st);
        }
    }
    let mut st = STATE.write().unwrap_or_else(|e| e.into_inner());
    if st.env.is_none() {
        st.env = Some(read_env());
    }
    f(&st)
}

/// Forgets the environment overrides read so far; the next dispatch reads them again.
pub fn reload_env() {
    STATE.write().unwrap_or_else(|e| e.into_inner()).env = None;
}

/// Sets (or with `None` clears) a process-wide override for one kernel. It beats the
/// environment but not [`with_choice`].
pub fn set_override(kernel: Kernel, choice: Option<Choice>) -> Result<(), KernelError> {
    if let Some(c) = choice {
        validate(kernel, c)?;
    }
    let mut st = STATE.write().unwrap_or_else(|e| e.into_inner());
    match choice {
        Some(c) => st.programmatic.per_kernel.insert(kernel, c),
        None => st.programmatic.per_kernel.remove(&kernel),
    };
    Ok(())
}

/// Sets (or clears) a process-wide override for every kernel, e.g.
/// `set_global_override(Some(Choice::Reference))` to run everything on the reference.
/// Per-kernel overrides still win.
pub fn set_global_override(choice: Option<Choice>) -> Result<(), KernelError> {
    if let Some(Choice::Impl(id)) = choice {
        return Err(KernelError::UnknownImpl {
            kernel: "all kernels",
            value: id.name().to_string(),
            known: "auto, fast, reference".to_string(),
        });
    }
    STATE
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .programmatic
        .all = choice;
    Ok(())
}

/// Removes every programmatic override (the environment ones stay).
pub fn clear_overrides() {
    STATE
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .programmatic = Overrides::default();
}

/// Runs `f` with `choice` for `kernel` (or every kernel with `None`) on this thread only;
/// the strongest override. Nested scopes stack; the innermost matching one wins.
pub fn with_choice<R>(
    kernel: Option<Kernel>,
    choice: Choice,
    f: impl FnOnce() -> R,
) -> Result<R, KernelError> {
    match kernel {
        Some(k) => validate(k, choice)?,
        None => {
            if let Choice::Impl(id) = choice {
                return Err(KernelError::UnknownImpl {
                    kernel: "all kernels",
                    value: id.name().to_string(),
                    known: "auto, fast, reference".to_string(),
                });
            }
        }
    }
    struct Pop;
    impl Drop for Pop {
        fn drop(&mut self) {
            SCOPED.with(|s| {
                s.borrow_mut().pop();
            });
        }
    }
    SCOPED.with(|s| s.borrow_mut().push((kernel, choice)));
    let _pop = Pop;
    Ok(f())
}

/// This thread's scoped choices ([`with_choice`]), innermost last: what a forward handed to
/// another thread must carry along (see [`with_scoped`]).
pub(crate) fn scoped_choices() -> Vec<(Option<Kernel>, Choice)> {
    SCOPED.with(|s| s.borrow().clone())
}

/// Runs `f` with `choices` as this thread's scoped choices, restoring its own afterwards
/// (also when `f` panics).
pub(crate) fn with_scoped<R>(choices: Vec<(Option<Kernel>, Choice)>, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Vec<(Option<Kernel>, Choice)>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Some(own) = self.0.take() {
                SCOPED.with(|s| *s.borrow_mut() = own);
            }
        }
    }
    let own = SCOPED.with(|s| std::mem::replace(&mut *s.borrow_mut(), choices));
    let _restore = Restore(Some(own));
    f()
}

/// Where the choice in force for a kernel comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChoiceSource {
    Default,
    Scoped,
    Programmatic,
    Env(String),
}

fn current_choice(kernel: Kernel) -> Result<(Choice, ChoiceSource), KernelError> {
    let scoped = SCOPED.with(|s| {
        s.borrow()
            .iter()
            .rev()
            .find(|(k, _)| k.is_none_or(|k| k == kernel))
            .map(|(_, c)| *c)
    });
    if let Some(c) = scoped {
        return Ok((c, ChoiceSource::Scoped));
    }
    with_state(|st| {
        if let Some(c) = st.programmatic.get(kernel) {
            return Ok((c, ChoiceSource::Programmatic));
        }
        match &st.env {
            Some(Ok(env)) => Ok(match (env.per_kernel.get(&kernel), env.all) {
                (Some(c), _) => (*c, ChoiceSource::Env(kernel.env_var())),
                (None, Some(c)) => (c, ChoiceSource::Env("ZAYA_KERNELS".to_string())),
                (None, None) => (Choice::Auto, ChoiceSource::Default),
            }),
            Some(Err(e)) => Err(e.clone()),
            None => Ok((Choice::Auto, ChoiceSource::Default)),
        }
    })
}

/// The implementation to run for a call of `kernel` on `dev` with `dtype` and main-operand
/// `shape`. Errors only when the environment overrides are malformed.
pub fn select(
    kernel: Kernel,
    dev: &Device,
    dtype: DType,
    shape: &Shape,
) -> Result<ImplId, KernelError> {
    let (choice, _) = current_choice(kernel)?;
    Ok(resolve(kernel, choice, dev, dtype, shape))
}

fn resolve(kernel: Kernel, choice: Choice, dev: &Device, dtype: DType, shape: &Shape) -> ImplId {
    let usable = |i: &&ImplInfo| (i.available)() && (i.supports)(dev, dtype, shape);
    let info = kernel.info();
    match choice {
        Choice::Reference => ImplId::Reference,
        Choice::Auto => info
            .fast
            .iter()
            .find(usable)
            .map_or(ImplId::Reference, |i| i.id),
        Choice::Impl(id) => info
            .fast
            .iter()
            .filter(|i| i.id == id)
            .find(usable)
            .map_or(ImplId::Reference, |i| i.id),
    }
}

/// One implementation in [`describe`]'s table.
#[derive(Debug, Clone)]
pub struct ImplStatus {
    pub name: &'static str,
    pub available: bool,
    pub summary: &'static str,
}

/// One kernel in [`describe`]'s table.
#[derive(Debug, Clone)]
pub struct KernelStatus {
    pub kernel: Kernel,
    pub summary: &'static str,
    pub implementations: Vec<ImplStatus>,
    /// The choice in force (`auto`, `reference`, an implementation name) and where it comes
    /// from, or the environment error.
    pub choice: String,
    /// What runs on the CPU for the kernel's example shape, per dtype.
    pub selected: Vec<(DType, &'static str)>,
}

/// The kernel table: every kernel, its implementations in this build on this machine, and
/// the one selected (CPU, example shape) for f32 and bf16.
pub fn describe() -> Vec<KernelStatus> {
    let dev = Device::Cpu;
    Kernel::ALL
        .into_iter()
        .map(|kernel| {
            let info = kernel.info();
            let implementations = info
                .implementations()
                .map(|i| ImplStatus {
                    name: i.name(),
                    available: (i.available)(),
                    summary: i.summary,
                })
                .collect();
            let shape = Shape::from_dims(info.example_shape);
            let (choice, selected) = match current_choice(kernel) {
                Ok((c, src)) => {
                    let from = match src {
                        ChoiceSource::Default => String::new(),
                        ChoiceSource::Scoped => " (scoped)".to_string(),
                        ChoiceSource::Programmatic => " (set in code)".to_string(),
                        ChoiceSource::Env(var) => format!(" ({var})"),
                    };
                    let selected = [DType::F32, DType::BF16]
                        .into_iter()
                        .map(|dt| (dt, resolve(kernel, c, &dev, dt, &shape).name()))
                        .collect();
                    (format!("{}{from}", c.describe()), selected)
                }
                Err(e) => (format!("error: {e}"), Vec::new()),
            };
            KernelStatus {
                kernel,
                summary: info.summary,
                implementations,
                choice,
                selected,
            }
        })
        .collect()
}

/// [`describe`] as a printable table (what `zaya kernels` shows).
pub struct KernelTable(pub Vec<KernelStatus>);

impl KernelTable {
    pub fn current() -> Self {
        KernelTable(describe())
    }
}

impl fmt::Display for KernelTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "threads: {}   simd: {:?}   blas: {}",
            cpu::num_threads(),
            cpu::simd_level(),
            if super::matmul::blas_available() {
                "openblas"
            } else {
                "not built (feature `blas`)"
            }
        )?;
        let rows: Vec<[String; 5]> = self
            .0
            .iter()
            .map(|k| {
                let impls = k
                    .implementations
                    .iter()
                    .map(|i| {
                        if i.available {
                            i.name.to_string()
                        } else {
                            format!("{} (not built)", i.name)
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                let sel = |dt: DType| {
                    k.selected
                        .iter()
                        .find(|(d, _)| *d == dt)
                        .map_or("-".to_string(), |(_, n)| n.to_string())
                };
                [
                    k.kernel.name().to_string(),
                    impls,
                    k.choice.clone(),
                    sel(DType::F32),
                    sel(DType::BF16),
                ]
            })
            .collect();
        let header = ["kernel", "implementations", "choice", "f32", "bf16"].map(String::from);
        let mut width = header.clone().map(|h| h.len());
        for r in &rows {
            for (w, c) in width.iter_mut().zip(r) {
                *w = (*w).max(c.len());
            }
        }
        for r in std::iter::once(&header).chain(rows.iter()) {
            let line = r
                .iter()
                .zip(width)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect::<Vec<_>>()
                .join("  ");
            writeln!(f, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_in_kernel_order_and_names_round_trip() {
        for (i, k) in Kernel::ALL.into_iter().enumerate() {
            assert_eq!(KERNELS[i].kernel, k);
            assert_eq!(Kernel::from_name(k.name()), Some(k));
            assert_eq!(Kernel::from_name(&k.name().to_ascii_uppercase()), Some(k));
        }
        assert_eq!(Kernel::from_name("nope"), None);
    }

    #[test]
    fn env_parsing_accepts_known_values_and_rejects_typos() {
        let ok = overrides_from_vars([
            ("ZAYA_KERNELS", "reference"),
            ("ZAYA_KERNEL_RMS_NORM", "fast"),
        ])
        .unwrap();
        assert_eq!(
            ok,
            vec![
                (None, Choice::Reference),
                (Some(Kernel::RmsNorm), Choice::Auto)
            ]
        );
        let ok = overrides_from_vars([("ZAYA_KERNEL_SOFTMAX", "fused")]).unwrap();
        assert_eq!(
            ok,
            vec![(Some(Kernel::Softmax), Choice::Impl(ImplId::Fused))]
        );
        assert!(matches!(
            overrides_from_vars([("ZAYA_KERNELS", "fastest")]),
            Err(KernelError::BadEnv { .. })
        ));
        assert!(matches!(
            overrides_from_vars([("ZAYA_KERNEL_RMSNORM", "reference")]),
            Err(KernelError::BadEnv { .. })
        ));
        // `blas` is not an implementation of softmax.
        assert!(overrides_from_vars([("ZAYA_KERNEL_SOFTMAX", "blas")]).is_err());
        // Unrelated variables are ignored.
        assert!(overrides_from_vars([("PATH", "/bin")]).unwrap().is_empty());
    }

    #[test]
    fn scoped_choice_wins_and_unsupported_calls_fall_back() {
        let dev = Device::Cpu;
        let shape = Shape::from_dims(&[4, 8]);
        let r = with_choice(Some(Kernel::Swiglu), Choice::Reference, || {
            select(Kernel::Swiglu, &dev, DType::F32, &shape).unwrap()
        })
        .unwrap();
        assert_eq!(r, ImplId::Reference);
        let nested = with_choice(None, Choice::Reference, || {
            with_choice(Some(Kernel::Swiglu), Choice::Auto, || {
                (
                    select(Kernel::Swiglu, &dev, DType::F32, &shape).unwrap(),
                    select(Kernel::RmsNorm, &dev, DType::F32, &shape).unwrap(),
                )
            })
            .unwrap()
        })
        .unwrap();
        assert_eq!(nested, (ImplId::Fused, ImplId::Reference));
        // f64 is declared unsupported by the fused implementations: the reference runs.
        let r = with_choice(Some(Kernel::Swiglu), Choice::Auto, || {
            select(Kernel::Swiglu, &dev, DType::F64, &shape).unwrap()
        })
        .unwrap();
        assert_eq!(r, ImplId::Reference);
        // An odd last axis cannot be split into gate and up: the reference reports it.
        let r = with_choice(Some(Kernel::Swiglu), Choice::Auto, || {
            select(Kernel::Swiglu, &dev, DType::F32, &Shape::from_dims(&[4, 7])).unwrap()
        })
        .unwrap();
        assert_eq!(r, ImplId::Reference);
        assert!(with_choice(Some(Kernel::Swiglu), Choice::Impl(ImplId::Blas), || ()).is_err());
    }

    #[test]
    fn table_lists_every_kernel_with_a_selection() {
        let rows = describe();
        assert_eq!(rows.len(), Kernel::ALL.len());
        for r in &rows {
            assert_eq!(r.implementations[0].name, "reference");
            assert!(r.implementations[0].available);
        }
        let text = KernelTable(rows).to_string();
        for k in Kernel::ALL {
            assert!(text.contains(k.name()), "{text}");
        }
    }
}
