//! progress.png, redrawn after every epoch as nnU-Net does: train loss with pseudo-Dice and its
//! EMA on a second axis, epoch time, learning rate. Drawn by plotters into an RGB buffer with a
//! bundled font (printable ASCII of DejaVu Sans, 10 KiB: no system fonts in a static binary or
//! a distroless image) and encoded by png; written to a temp file and renamed.

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;
use std::io::BufWriter;
use std::path::Path;
use std::sync::Once;

const WIDTH: u32 = 1200;
const HEIGHT: u32 = 1500;
const FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans-ascii.ttf");

/// One finished epoch as the plot needs it.
#[derive(Clone, Copy, Debug)]
pub struct Point {
    pub train_loss: f64,
    pub pseudo_dice: f64,
    pub ema_dice: f64,
    pub seconds: f64,
    pub lr: f64,
}

fn register_font() {
    static ONCE: Once = Once::new();
    // A bundled, known-good font cannot fail to parse; if it somehow did, text would be missing
    // and drawing reports the error.
    ONCE.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// (min, max) of the finite values, widened so a flat or empty series still has a range.
fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.filter(|v| v.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if lo > hi {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-6 * hi.abs().max(1.0));
    (lo - pad, hi + pad)
}

fn series(points: &[Point], f: impl Fn(&Point) -> f64) -> Vec<(f64, f64)> {
    points.iter().enumerate().map(|(e, p)| (e as f64, f(p))).filter(|(_, v)| v.is_finite()).collect()
}

/// Renders the three panels into an RGB buffer of WIDTH x HEIGHT.
pub fn render(points: &[Point]) -> Result<Vec<u8>> {
    register_font();
    let mut buf = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing progress.png: {e}");
    {
        let root = BitMapBackend::with_buffer(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let panels = root.split_evenly((3, 1));
        let epochs = (points.len().max(2) - 1) as f64;
        let font = ("sans-serif", 18);
        // At most one label per epoch: more would print the same rounded epoch twice.
        let x_labels = (epochs as usize + 1).min(10);

        let (lo, hi) = range(points.iter().map(|p| p.train_loss));
        let mut c = ChartBuilder::on(&panels[0])
            .caption("loss and pseudo-Dice", ("sans-serif", 24))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .right_y_label_area_size(70)
            .build_cartesian_2d(0f64..epochs, lo..hi)
            .map_err(|e| err(&e))?
            .set_secondary_coord(0f64..epochs, 0f64..1f64);
        c.configure_mesh().x_desc("epoch").x_labels(x_labels).x_label_formatter(&|x| format!("{x:.0}")).y_desc("train loss").label_style(font).axis_desc_style(font).draw().map_err(|e| err(&e))?;
        c.configure_secondary_axes().y_desc("pseudo-Dice").label_style(font).axis_desc_style(font).draw().map_err(|e| err(&e))?;
        let legend = |color: RGBColor| move |(x, y): (i32, i32)| PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3));
        c.draw_series(LineSeries::new(series(points, |p| p.train_loss), BLUE.stroke_width(2))).map_err(|e| err(&e))?.label("train loss").legend(legend(BLUE));
        let green = RGBColor(0, 150, 0);
        c.draw_secondary_series(series(points, |p| p.pseudo_dice).into_iter().map(|xy| Circle::new(xy, 3, green.filled())))
            .map_err(|e| err(&e))?
            .label("pseudo-Dice")
            .legend(move |(x, y)| Circle::new((x + 12, y), 4, green.filled()));
        c.draw_secondary_series(LineSeries::new(series(points, |p| p.ema_dice), green.stroke_width(3))).map_err(|e| err(&e))?.label("pseudo-Dice (EMA)").legend(legend(green));
        c.configure_series_labels().label_font(font).background_style(WHITE.mix(0.85)).border_style(BLACK).position(SeriesLabelPosition::UpperRight).draw().map_err(|e| err(&e))?;

        for (panel, title, desc, f, color) in [
            (&panels[1], "epoch time", "seconds", (|p: &Point| p.seconds) as fn(&Point) -> f64, RGBColor(200, 80, 0)),
            (&panels[2], "learning rate", "learning rate", |p: &Point| p.lr, RGBColor(120, 0, 160)),
        ] {
            let (lo, hi) = range(points.iter().map(f));
            let mut c = ChartBuilder::on(panel)
                .caption(title, ("sans-serif", 24))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .build_cartesian_2d(0f64..epochs, lo.min(0.0)..hi)
                .map_err(|e| err(&e))?;
            c.configure_mesh().x_desc("epoch").x_labels(x_labels).x_label_formatter(&|x| format!("{x:.0}")).y_desc(desc).label_style(font).axis_desc_style(font).draw().map_err(|e| err(&e))?;
            c.draw_series(LineSeries::new(series(points, f), color.stroke_width(2))).map_err(|e| err(&e))?;
        }
        root.present().map_err(|e| err(&e))?;
    }
    Ok(buf)
}

/// Draws and writes `path` (temp file, then rename: a reader never sees half a PNG).
pub fn write_progress(path: &Path, points: &[Point]) -> Result<()> {
    let rgb = render(points)?;
    let tmp = path.with_extension("png.tmp");
    let r = encode(&tmp, &rgb).and_then(|()| std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display())));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

fn encode(tmp: &Path, rgb: &[u8]) -> Result<()> {
    let file = std::fs::File::create(tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut enc = png::Encoder::new(BufWriter::new(file), WIDTH, HEIGHT);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header().with_context(|| format!("writing {}", tmp.display()))?;
    w.write_image_data(rgb).with_context(|| format!("writing {}", tmp.display()))?;
    w.finish().with_context(|| format!("writing {}", tmp.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history(n: usize) -> Vec<Point> {
        (0..n)
            .map(|e| {
                let t = e as f64 / n.max(1) as f64;
                Point { train_loss: -0.2 - 0.6 * t, pseudo_dice: 0.3 + 0.6 * t, ema_dice: 0.25 + 0.6 * t, seconds: 40.0 + (e % 3) as f64, lr: 0.01 * (1.0 - t).powf(0.9) }
            })
            .collect()
    }

    fn count(rgb: &[u8], want: [u8; 3]) -> usize {
        rgb.chunks_exact(3).filter(|p| p == &want).count()
    }

    #[test]
    fn every_series_and_text_is_drawn() {
        let rgb = render(&history(40)).unwrap();
        assert!(count(&rgb, [0, 0, 255]) > 500, "train loss line (blue)");
        assert!(count(&rgb, [0, 150, 0]) > 500, "pseudo-Dice points and EMA (green)");
        assert!(count(&rgb, [200, 80, 0]) > 500, "epoch time line");
        assert!(count(&rgb, [120, 0, 160]) > 500, "learning rate line");
        // The top strip holds only the title: its dark pixels are glyphs (no font, no ink).
        let strip = &rgb[..(WIDTH * 30 * 3) as usize];
        let ink = strip.chunks_exact(3).filter(|p| p.iter().all(|&c| c < 128)).count();
        assert!(ink > 200, "caption glyph pixels: {ink}");
    }

    #[test]
    fn empty_flat_and_nan_histories_draw() {
        render(&[]).unwrap();
        let mut h = history(1);
        h[0].train_loss = f64::NAN;
        render(&h).unwrap();
        render(&[h[0]; 5]).unwrap();
    }

    #[test]
    fn writes_a_png_a_decoder_reads() {
        let dir = std::env::temp_dir().join(format!("segk-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("progress.png");
        write_progress(&path, &history(12)).unwrap();
        let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
        let r = dec.read_info().unwrap();
        assert_eq!((r.info().width, r.info().height), (WIDTH, HEIGHT));
        assert!(!dir.join("progress.png.tmp").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
