//! Compiles kernels/*.cu into one fatbin (SASS for sm_80 and sm_90, PTX for compute_90)
//! with nvcc, embedded by src/backend/cuda. nvcc is looked up in $NVCC, $CUDA_HOME/bin,
//! $CUDA_PATH/bin, then PATH. Without nvcc the crate still builds (the CUDA backend then
//! says it was built without kernels); SEGK_REQUIRE_KERNELS=1 makes that, and any register
//! spill not listed in kernels/spills-allowed.txt, a build error.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const GENCODE: [&str; 3] = ["arch=compute_80,code=sm_80", "arch=compute_90,code=sm_90", "arch=compute_90,code=compute_90"];

fn find_nvcc() -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC").map(PathBuf::from) {
        return p.is_file().then_some(p);
    }
    let homes = ["CUDA_HOME", "CUDA_PATH"].into_iter().filter_map(env::var_os).map(|h| PathBuf::from(h).join("bin"));
    let path = env::var_os("PATH").map(|p| env::split_paths(&p).collect::<Vec<_>>()).unwrap_or_default();
    homes.chain(path).map(|d| d.join("nvcc")).find(|p| p.is_file())
}

fn kernel_sources(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir).map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default();
    v.retain(|p| p.extension().is_some_and(|e| e == "cu" || e == "cuh"));
    v.sort();
    v
}

/// Kernels whose ptxas report shows spill stores or loads, from `ptxas -v` output.
fn spilling_kernels(report: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = None;
    for line in report.lines() {
        if let Some(rest) = line.split("Function properties for ").nth(1) {
            current = Some(rest.trim().to_string());
        } else if line.contains("spill stores") {
            let spills = line.split(',').any(|part| {
                let part = part.trim();
                (part.ends_with("bytes spill stores") || part.ends_with("bytes spill loads")) && !part.starts_with("0 ")
            });
            if let (true, Some(name)) = (spills, current.take()) {
                if !out.contains(&name) {
                    out.push(name);
                }
            }
        }
    }
    out
}

fn allowed_spills(dir: &Path) -> Vec<String> {
    let text = fs::read_to_string(dir.join("spills-allowed.txt")).unwrap_or_default();
    text.lines().filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#')).filter_map(|l| l.split_whitespace().next().map(str::to_string)).collect()
}

/// Names of the `extern "C" __global__` kernels in `src`.
fn kernel_names(src: &str) -> Vec<String> {
    let mut names = Vec::new();
    for part in src.split("extern \"C\" __global__ void").skip(1) {
        let mut rest = part.trim_start();
        if let Some(r) = rest.strip_prefix("__launch_bounds__(") {
            rest = r.split_once(')').map(|(_, r)| r.trim_start()).unwrap_or("");
        }
        let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if !name.is_empty() {
            names.push(name);
        }
    }
    names
}

/// The kernels compiled as C++ for the CPU emulator (kernels/emu), behind `--device emu`: every
/// kernel runs on the host, so the GPU code path is checked against the CPU twins where no GPU
/// is. Needs a C++ compiler (the cc crate's choice, $CXX); without one the build goes on.
/// Links nothing beyond libc and libm (no libstdc++: no exceptions, RTTI or static guards).
fn build_emulator(kdir: &Path, sources: &[PathBuf], out: &Path) {
    let cus: Vec<&PathBuf> = sources.iter().filter(|p| p.extension().is_some_and(|e| e == "cu")).collect();
    let mut unity: String = cus.iter().map(|p| format!("#include \"{}\"\n", p.display())).collect();
    let names: Vec<String> = cus.iter().flat_map(|p| kernel_names(&fs::read_to_string(p).unwrap_or_default())).collect();
    unity += &format!("#define EMU_KERNELS(X) {}\n", names.iter().map(|n| format!("X({n})")).collect::<Vec<_>>().join(" "));
    unity += &format!("#include \"{}\"\n", kdir.join("emu/emu.cpp").display());
    let file = out.join("segk_emu.cpp");
    fs::write(&file, unity).expect("write emulator source");
    for f in ["emu/emu.h", "emu/emu.cpp"] {
        println!("cargo:rerun-if-changed={}", kdir.join(f).display());
    }
    let built = cc::Build::new()
        .cpp(true)
        .cpp_link_stdlib(None)
        .std("c++17")
        .opt_level(2)
        .define("SEGK_EMU", None)
        .flag("-include")
        .flag(kdir.join("emu/emu.h").to_str().expect("UTF-8 path"))
        .flag("-fno-exceptions")
        .flag("-fno-rtti")
        .flag("-fno-threadsafe-statics")
        .warnings(false)
        .file(&file)
        .try_compile("segk_emu");
    match built {
        Ok(()) => {
            println!("cargo:rustc-cfg=segk_emu");
            println!("cargo:rustc-env=SEGK_EMU_INFO=yes (--device emu runs the CUDA kernels on the CPU)");
            // The fake driver (kernels/emu/driver.c) finds the emulator in the process by name.
            // zig's linker (scripts/build-portable.sh, binaries for GPU machines, where the real
            // driver is) does not take the flag: those binaries go without.
            let zig = env::var("RUSTC_LINKER").is_ok_and(|l| l.contains("zig"));
            if !zig {
                for sym in ["segk_emu_launch", "segk_emu_error", "segk_emu_param_sizes"] {
                    println!("cargo:rustc-link-arg=-Wl,--export-dynamic-symbol={sym}");
                }
                build_fake_driver(kdir, out);
            } else {
                println!("cargo:rustc-env=SEGK_FAKE_CUDA_DIR=");
            }
        }
        Err(e) => {
            // A kernel the emulator cannot compile must not pass unnoticed where it is required (CI).
            if env::var("SEGK_REQUIRE_EMU").is_ok_and(|v| v == "1") {
                panic!("SEGK_REQUIRE_EMU=1 but the kernel emulator did not build: {e}");
            }
            println!("cargo:warning=the kernel emulator did not build ({e}): `--device emu` unavailable");
            println!("cargo:rustc-env=SEGK_EMU_INFO=no (the emulator did not build: no C++ compiler, or a kernel it cannot compile)");
        }
    }
}

/// kernels/emu/driver.c as OUT_DIR/fakecuda/libcuda.so: an NVIDIA driver whose GPU is the
/// kernel emulator, so tests run `--device cuda` (cudarc, streams, events, copies) with no GPU;
/// kernels/emu/nccl.c beside it as libnccl.so (collectives between processes in shared memory).
/// Its directory reaches the tests as SEGK_FAKE_CUDA_DIR (empty when it did not build).
fn build_fake_driver(kdir: &Path, out: &Path) {
    let src = kdir.join("emu/driver.c");
    println!("cargo:rerun-if-changed={}", src.display());
    let dir = out.join("fakecuda");
    let _ = fs::create_dir_all(&dir);
    let lib = dir.join("libcuda.so");
    let compiler = cc::Build::new().cargo_metadata(false).get_compiler();
    let build = |src: &Path, lib: &Path| compiler.to_command().args(["-shared", "-fPIC", "-O2", "-pthread", "-o"]).arg(lib).arg(src).arg("-ldl").output();
    // The fake NCCL (kernels/emu/nccl.c) sits beside it: multi-rank runs on the fake driver.
    let nccl = kdir.join("emu/nccl.c");
    println!("cargo:rerun-if-changed={}", nccl.display());
    let res = build(&src, &lib).and_then(|o| if o.status.success() { build(&nccl, &dir.join("libnccl.so.2")) } else { Ok(o) });
    match res {
        Ok(o) if o.status.success() => println!("cargo:rustc-env=SEGK_FAKE_CUDA_DIR={}", dir.display()),
        other => {
            let why = match other {
                Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                Err(e) => e.to_string(),
            };
            if env::var("SEGK_REQUIRE_EMU").is_ok_and(|v| v == "1") {
                panic!("SEGK_REQUIRE_EMU=1 but the fake driver (kernels/emu/driver.c) did not build: {why}");
            }
            println!("cargo:warning=the fake driver did not build ({why}): its tests will skip");
            println!("cargo:rustc-env=SEGK_FAKE_CUDA_DIR=");
        }
    }
}

/// The commit this build comes from, for `segk --version`.
fn git_commit(root: &Path) -> String {
    let out = Command::new("git").arg("-C").arg(root).args(["rev-parse", "--short=12", "HEAD"]).output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        _ => "unknown".into(),
    }
}

fn main() {
    println!("cargo::rustc-check-cfg=cfg(segk_kernels)");
    println!("cargo::rustc-check-cfg=cfg(segk_emu)");
    for v in ["NVCC", "CUDA_HOME", "CUDA_PATH", "PATH", "SEGK_REQUIRE_KERNELS", "SEGK_REQUIRE_EMU", "CXX", "CXXFLAGS", "RUSTC_LINKER"] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    println!("cargo:rustc-env=SEGK_GIT_COMMIT={}", git_commit(&root));
    println!("cargo:rerun-if-changed={}", root.join(".git/HEAD").display());
    let kdir = root.join("kernels");
    println!("cargo:rerun-if-changed={}", kdir.display());
    let sources = kernel_sources(&kdir);
    for s in &sources {
        println!("cargo:rerun-if-changed={}", s.display());
    }
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let (fatbin, report_path) = (out.join("segk.fatbin"), out.join("ptxas-report.txt"));
    let require = env::var("SEGK_REQUIRE_KERNELS").is_ok_and(|v| v == "1");

    // A fully static binary cannot load the NVIDIA driver (dlopen from static glibc is not
    // supported), so the static build is CPU-only and carries no kernels.
    let static_crt = env::var("CARGO_CFG_TARGET_FEATURE").is_ok_and(|f| f.split(',').any(|x| x == "crt-static"));
    if static_crt {
        fs::write(&fatbin, []).expect("write empty fatbin");
        fs::write(&report_path, "static CPU-only build: no CUDA kernels\n").expect("write report");
        println!("cargo:rustc-env=SEGK_KERNEL_INFO=none (static CPU-only build: it cannot use a GPU)");
        println!("cargo:rustc-env=SEGK_EMU_INFO=no (static CPU-only build)");
        return;
    }

    build_emulator(&kdir, &sources, &out);

    let Some(nvcc) = find_nvcc() else {
        if require {
            panic!("SEGK_REQUIRE_KERNELS=1 but nvcc was not found in $NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin or PATH");
        }
        fs::write(&fatbin, []).expect("write empty fatbin");
        fs::write(&report_path, "built without CUDA kernels: nvcc not found\n").expect("write report");
        println!("cargo:warning=nvcc not found: building without CUDA kernels (install the CUDA toolkit and rebuild for --device cuda)");
        println!("cargo:rustc-env=SEGK_KERNEL_INFO=none (built without nvcc)");
        return;
    };

    // One translation unit, so one fatbin holds every kernel.
    let unity = out.join("segk_kernels.cu");
    let includes: String = sources.iter().filter(|p| p.extension().is_some_and(|e| e == "cu")).map(|p| format!("#include \"{}\"\n", p.display())).collect();
    fs::write(&unity, includes).expect("write unity source");
    let mut cmd = Command::new(&nvcc);
    cmd.args(["-fatbin", "-O3", "-std=c++17", "-lineinfo", "-Xptxas", "-v", "-I"]).arg(&kdir);
    for g in GENCODE {
        cmd.args(["-gencode", g]);
    }
    cmd.arg("-o").arg(&fatbin).arg(&unity);
    let res = cmd.output().unwrap_or_else(|e| panic!("running {}: {e}", nvcc.display()));
    let report = format!("{}{}", String::from_utf8_lossy(&res.stdout), String::from_utf8_lossy(&res.stderr));
    fs::write(&report_path, &report).expect("write ptxas report");
    if !res.status.success() {
        panic!("nvcc failed compiling kernels/*.cu:\n{report}");
    }
    let allowed = allowed_spills(&kdir);
    let spills: Vec<String> = spilling_kernels(&report).into_iter().filter(|k| !allowed.contains(k)).collect();
    if !spills.is_empty() {
        let msg = format!("kernels spill registers to local memory: {} (see {}; list a kernel with a reason in kernels/spills-allowed.txt if it must)", spills.join(", "), report_path.display());
        if require {
            panic!("{msg}");
        }
        println!("cargo:warning={msg}");
    }
    println!("cargo:rustc-cfg=segk_kernels");
    let version = Command::new(&nvcc).arg("--version").output().map(|o| String::from_utf8_lossy(&o.stdout).lines().find_map(|l| l.split("release ").nth(1).map(str::to_string)).unwrap_or_default()).unwrap_or_default();
    println!("cargo:rustc-env=SEGK_KERNEL_INFO=embedded, sm_80 sm_90 SASS + compute_90 PTX, nvcc {version}");
    // The CUDA release the PTX is for: a driver older than it cannot load the module.
    println!("cargo:rustc-env=SEGK_NVCC_RELEASE={}", version.split(',').next().unwrap_or("").trim());
}
