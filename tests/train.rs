//! A short CPU training run must reduce the loss and segment held-out cases.

use segk::demo::{self, DemoConfig};

#[test]
fn short_training_run_learns() {
    let cfg = DemoConfig {
        train_cases: 8,
        test_cases: 2,
        size: [32, 32, 32],
        patch: [32, 32, 32],
        epochs: 6,
        iters_per_epoch: 25,
        progress: false,
        seed: 7,
        ..DemoConfig::default()
    };
    let r = demo::run(&cfg).unwrap();
    eprintln!("loss {:.4} -> {:.4}, dice {:?}, mean {:.4}, {:.1} s", r.first_epoch_loss, r.last_epoch_loss, r.dice, r.mean_dice, r.train_secs);
    assert!(r.last_epoch_loss < r.first_epoch_loss - 0.3, "loss did not fall enough: {} -> {}", r.first_epoch_loss, r.last_epoch_loss);
    assert!(r.mean_dice >= 0.7, "held-out mean foreground Dice {:.4} < 0.7", r.mean_dice);
}
