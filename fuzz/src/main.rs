//! One AFL++ harness for every target: `segk-fuzz TARGET` (the targets: segk::fuzz::TARGETS);
//! `segk-fuzz --seeds TARGET FIXTURES OUT` writes the target's seed corpus.
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let known = |t: &str| segk::fuzz::TARGETS.iter().any(|k| k.0 == t);
    if let [_, flag, target, fixtures, out] = args.as_slice() {
        if flag == "--seeds" && known(target) {
            std::fs::create_dir_all(out).expect("creating the corpus folder");
            for (i, s) in segk::fuzz::seeds(target, fixtures.as_ref()).iter().enumerate() {
                std::fs::write(std::path::Path::new(out).join(format!("seed{i:03}")), s).expect("writing a seed");
            }
            return;
        }
    }
    let target = args.get(1).cloned().unwrap_or_default();
    if !known(&target) {
        eprintln!("usage: segk-fuzz TARGET | --seeds TARGET FIXTURES OUT  (targets: {})", segk::fuzz::TARGETS.map(|t| t.0).join(", "));
        std::process::exit(2);
    }
    let dir = segk::fuzz::scratch();
    afl::fuzz!(|data: &[u8]| {
        let _ = segk::fuzz::run(&target, data, &dir);
    });
}
