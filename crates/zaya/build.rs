//! With the `blas` feature, find the system OpenBLAS through pkg-config (Debian's
//! `libopenblas-dev` ships `openblas.pc`). Without the feature this does nothing, so the
//! default build needs no system library.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "blas")]
    {
        if let Err(e) = pkg_config::Config::new().probe("openblas") {
            // A build script can only report through the build failing; say what to install.
            println!(
                "cargo:warning=the `blas` feature needs the system OpenBLAS (Debian/Ubuntu: \
                 apt-get install libopenblas-dev): {e}"
            );
            std::process::exit(1);
        }
    }
}
