//! Environment overrides of the kernel registry. The environment is process-global and
//! read on first use, so this file is its own test binary with a single test that sets the
//! variables before anything dispatches.

use candle_core::{DType, Device, Tensor};
use zaya::kernels::{
    self,
    registry::{self, Choice, ImplId, Kernel, KernelTable},
};

#[test]
fn env_overrides_select_and_bad_values_are_errors() {
    // Edition 2021: set_var is safe; no other thread of this binary runs yet.
    std::env::set_var("ZAYA_KERNELS", "reference");
    std::env::set_var("ZAYA_KERNEL_SWIGLU", "fast");
    registry::reload_env();
    let dev = Device::Cpu;
    let shape = candle_core::Shape::from_dims(&[4, 8]);
    let sel = |k| registry::select(k, &dev, DType::F32, &shape).unwrap();
    assert_eq!(sel(Kernel::RmsNorm), ImplId::Reference);
    assert_eq!(sel(Kernel::Softmax), ImplId::Reference);
    assert_eq!(sel(Kernel::Swiglu), ImplId::Fused);

    let table = KernelTable::current().to_string();
    assert!(table.contains("reference (ZAYA_KERNELS)"), "{table}");
    assert!(table.contains("auto (ZAYA_KERNEL_SWIGLU)"), "{table}");

    // Code beats the environment, the thread scope beats code.
    registry::set_override(Kernel::RmsNorm, Some(Choice::Auto)).unwrap();
    assert_eq!(sel(Kernel::RmsNorm), ImplId::Fused);
    let scoped = registry::with_choice(Some(Kernel::RmsNorm), Choice::Reference, || {
        sel(Kernel::RmsNorm)
    })
    .unwrap();
    assert_eq!(scoped, ImplId::Reference);
    registry::clear_overrides();
    assert_eq!(sel(Kernel::RmsNorm), ImplId::Reference);

    // A typo is reported by every dispatch (no silent fallback, no panic).
    std::env::set_var("ZAYA_KERNEL_RMSNORM", "reference");
    registry::reload_env();
    let x = Tensor::ones((2, 4), DType::F32, &dev).unwrap();
    let w = Tensor::ones(4, DType::F32, &dev).unwrap();
    let err = kernels::rms_norm(&x, &w, 1e-5).unwrap_err().to_string();
    assert!(
        err.contains("ZAYA_KERNEL_RMSNORM") && err.contains("rms_norm"),
        "{err}"
    );
    assert!(KernelTable::current().to_string().contains("error"));

    std::env::remove_var("ZAYA_KERNEL_RMSNORM");
    std::env::set_var("ZAYA_KERNELS", "fast");
    registry::reload_env();
    assert!(kernels::rms_norm(&x, &w, 1e-5).is_ok());
    assert_eq!(sel(Kernel::RmsNorm), ImplId::Fused);
}
