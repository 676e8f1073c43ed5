//! Every image format against what nnU-Net's own readers (SimpleITK, nibabel, skimage,
//! tifffile) return for the same files: tests/fixtures/image_formats/make.py wrote them and
//! expected.json; and each format written by segk reads back as it was.

use segk::imageio::{self, itk, Header, Volume, VoxelType};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/image_formats")
}

fn expected() -> serde_json::Map<String, Value> {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["files"].as_object().unwrap().clone()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + b.abs())
}

/// segk's geometry in SimpleITK's terms: spacing (x, y, z), origin and direction (LPS).
fn itk_view(v: &Volume) -> itk::Geometry {
    itk::Geometry::of(&Volume { header: Header::Natural, ..v.clone() })
}

#[test]
fn every_fixture_reads_as_nnunet_reads_it() {
    let mut checked = 0;
    for (name, e) in expected() {
        let v = imageio::read_channels(&fixtures().join(&name)).unwrap_or_else(|err| panic!("{name}: {err:#}"));
        let shape: Vec<usize> = e["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        assert_eq!((v.channels(), v.shape.to_vec()), (shape[0], shape[1..].to_vec()), "{name}: shape");
        let want = floats(&e["data"]);
        assert_eq!(v.data.len(), want.len(), "{name}: voxels");
        for (i, (&a, &b)) in v.data.iter().zip(&want).enumerate() {
            assert!(a == b as f32 || (a.is_nan() && b.is_nan()), "{name}: voxel {i} is {a}, nnU-Net reads {b}");
        }
        for (a, b) in v.spacing.iter().zip(floats(&e["spacing"])) {
            assert!(close(*a, b, 1e-12), "{name}: spacing {:?}, nnU-Net's {:?}", v.spacing, e["spacing"]);
        }
        if e.get("sitk_direction").is_some() {
            // The geometry SimpleITK reports: exact for ITK's formats, to float32 for NIfTI.
            let tol = if name.contains(".nii") { 2e-6 } else { 1e-15 };
            let g = match &v.header {
                Header::Itk(g) => g.clone(),
                _ => itk_view(&v),
            };
            let n = floats(&e["sitk_spacing"]).len();
            assert_eq!(g.dims, n, "{name}: dimensions");
            for (a, b) in g.spacing.iter().zip(floats(&e["sitk_spacing"])) {
                assert!(close(*a, b, tol), "{name}: ITK spacing {:?} vs {:?}", g.spacing, e["sitk_spacing"]);
            }
            for (a, b) in g.origin.iter().zip(floats(&e["sitk_origin"])) {
                assert!(close(*a, b, tol), "{name}: origin {:?} vs {:?}", g.origin, e["sitk_origin"]);
            }
            let d = floats(&e["sitk_direction"]);
            for r in 0..n {
                for c in 0..n {
                    assert!(close(g.direction[r][c], d[r * n + c], tol), "{name}: direction {:?} vs {d:?}", g.direction);
                }
            }
        }
        checked += 1;
    }
    assert_eq!(checked, 54, "fixtures checked");
}

/// The voxel type a fixture was stored as, to write it back the same.
fn type_of(dtype: &str) -> VoxelType {
    match dtype {
        "uint8" => VoxelType::U8,
        "int8" => VoxelType::I8,
        "uint16" => VoxelType::U16,
        "int16" => VoxelType::I16,
        "uint32" => VoxelType::U32,
        "int32" => VoxelType::I32,
        "uint64" => VoxelType::U64,
        "int64" => VoxelType::I64,
        "float64" => VoxelType::F64,
        _ => VoxelType::F32,
    }
}

#[test]
fn every_format_and_type_round_trips_with_its_geometry() {
    let dir = std::env::temp_dir().join(format!("segk-imageio-rt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, e) in expected() {
        let v = imageio::read_channels(&fixtures().join(&name)).unwrap();
        if v.channels() > 1 {
            continue; // label maps are one channel; pictures are read, not written
        }
        let ty = type_of(e["dtype"].as_str().unwrap());
        for ending in [".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr", ".tif", ".png"] {
            if ending == ".png" && (v.shape[0] != 1 || v.data.iter().any(|&x| !(0.0..=65535.0).contains(&x) || x.fract() != 0.0)) {
                continue;
            }
            let out = dir.join(format!("rt{ending}"));
            imageio::write_atomic(&out, &v, ty).unwrap_or_else(|err| panic!("{name} as {ending}: {err:#}"));
            // SEGK_KEEP_WRITTEN=DIR keeps every file written here, for nnU-Net's readers to
            // check (tests/fixtures/image_formats/check_written.py).
            if let Ok(keep) = std::env::var("SEGK_KEEP_WRITTEN") {
                // The whole fixture name: sitk_i16.mha and sitk_i16.nrrd must not overwrite each other.
                let to = Path::new(&keep).join(format!("{name}__as{ending}"));
                std::fs::create_dir_all(&keep).unwrap();
                imageio::write_atomic(&to, &v, ty).unwrap();
            }
            let back = imageio::read(&out).unwrap_or_else(|err| panic!("{name} as {ending}: {err:#}"));
            assert_eq!(back.shape, v.shape, "{name} as {ending}");
            assert!(back.data.iter().zip(&v.data).all(|(a, b)| a == b || (a.is_nan() && b.is_nan())), "{name} as {ending}: voxels differ");
            // Geometry survives within the precision of the target format (NIfTI: float32;
            // PNG and TIFF keep none but nnU-Net's spacing conventions).
            match ending {
                ".png" | ".tif" => {}
                _ => {
                    let tol = if ending == ".nii.gz" || name.contains(".nii") { 3e-6 } else { 1e-12 };
                    for (a, b) in back.spacing.iter().zip(&v.spacing) {
                        assert!(close(*a, *b, tol), "{name} as {ending}: spacing {:?} vs {:?}", back.spacing, v.spacing);
                    }
                    for r in 0..3 {
                        for c in 0..4 {
                            assert!(close(back.affine[r][c], v.affine[r][c], tol * 10.0), "{name} as {ending}: affine {:?} vs {:?}", back.affine, v.affine);
                        }
                    }
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `segk ARGS` with none of nnU-Net's folder variables set (everything beside the dataset).
fn segk(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_segk")).args(args).env_remove("nnUNet_preprocessed").env_remove("nnUNet_results").env_remove("nnUNet_raw").output().unwrap()
}

fn ok(out: std::process::Output) -> String {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    text
}

fn fresh(tag: &str) -> PathBuf {
    let base = std::env::temp_dir().join(format!("segk-formats-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    base
}

/// A copy of the NIfTI dataset `src` with every image and label map in the format of `ending`.
fn convert(src: &Path, dst: &Path, ending: &str) {
    for sub in ["imagesTr", "labelsTr"] {
        std::fs::create_dir_all(dst.join(sub)).unwrap();
        for f in std::fs::read_dir(src.join(sub)).unwrap() {
            let f = f.unwrap().path();
            let name = f.file_name().unwrap().to_string_lossy().replace(".nii.gz", ending);
            let ty = if sub == "imagesTr" { VoxelType::I16 } else { VoxelType::U8 };
            imageio::write(&dst.join(sub).join(name), &imageio::read(&f).unwrap(), ty).unwrap();
        }
    }
    let json = std::fs::read_to_string(src.join("dataset.json")).unwrap().replace(".nii.gz", ending);
    std::fs::write(dst.join("dataset.json"), json).unwrap();
}

/// Every file of a store folder, by name: JSON parsed (numbers compared as numbers), the
/// rest as bytes.
type Files = std::collections::BTreeMap<String, Result<Value, Vec<u8>>>;

fn store_files(dir: &Path) -> Files {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            let bytes = std::fs::read(&p).unwrap();
            let v = if name.ends_with(".json") { Ok(serde_json::from_slice(&bytes).unwrap()) } else { Err(bytes) };
            (name, v)
        })
        .collect()
}

/// One dataset written as NIfTI, MetaImage (.mha, .mhd), NRRD (.nrrd, .nhdr) and a TIFF stack
/// gives the same plans and the same preprocessed store, file for file.
#[test]
fn a_dataset_in_every_volume_format_plans_and_preprocesses_as_in_nifti() {
    let base = fresh("same");
    let nii = base.join("nii/Dataset061_Fmt");
    ok(segk(&["synth", nii.to_str().unwrap(), "--cases", "3", "--shape", "20,24,28", "--spacing", "2.5,1,1"]));
    let endings = [".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr", ".tif"];
    for ending in &endings[1..] {
        convert(&nii, &base.join(&ending[1..]).join("Dataset061_Fmt"), ending);
    }
    let mut reference: Option<(Value, Files)> = None;
    for ending in endings {
        let tag = if ending == ".nii.gz" { "nii" } else { &ending[1..] };
        let root = base.join(tag).join("Dataset061_Fmt");
        let text = ok(segk(&["preprocess", root.to_str().unwrap(), "-c", "3d_fullres"]));
        assert!(text.contains("3 cases preprocessed"), "{ending}: {text}");
        let pre = base.join(tag).join("segk_preprocessed/Dataset061_Fmt");
        let mut plans: Value = serde_json::from_slice(&std::fs::read(pre.join("nnUNetPlans.json")).unwrap()).unwrap();
        let reader = plans["image_reader_writer"].take();
        assert_eq!(reader, if ending == ".tif" { "Tiff3DIO" } else { "SimpleITKIO" }, "{ending}");
        let store = store_files(&pre.join("segk_nnUNetPlans_3d_fullres"));
        assert_eq!(store.len(), 3 * 4, "{ending}: {:?}", store.keys());
        match &reference {
            None => reference = Some((plans, store)),
            Some((p, s)) => {
                assert_eq!(&plans, p, "{ending}: plans differ from NIfTI's");
                for (name, v) in s {
                    assert!(store.get(name) == Some(v), "{ending}: {name} differs from NIfTI's");
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&base);
}

/// An RGB PNG as skimage writes one: rows × cols pixels, channel-interleaved.
fn write_rgb_png(path: &Path, rows: usize, cols: usize, rgb: &[[u8; 3]]) {
    let file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut enc = png::Encoder::new(file, cols as u32, rows as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header().unwrap();
    w.write_image_data(&rgb.iter().flatten().copied().collect::<Vec<u8>>()).unwrap();
    w.finish().unwrap();
}

/// nnU-Net's 2D natural-image datasets (Dataset120_RoadSegmentation's layout): one RGB PNG
/// per case holding channels R, G, B, PNG label maps. segk plans 2d with NaturalImage2DIO,
/// trains, predicts PNG label maps on the input's grid, and evaluates them.
#[test]
fn an_rgb_png_dataset_goes_through_the_whole_pipeline() {
    let base = fresh("png");
    let root = base.join("Dataset062_Disc");
    for d in ["imagesTr", "labelsTr"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    for i in 0..4usize {
        let (rows, cols) = (40 + 2 * i, 48);
        let (cy, cx, r) = (18.0 + i as f64, 22.0, 8.0 + i as f64);
        let disc = |v: usize| (((v / cols) as f64 - cy).powi(2) + ((v % cols) as f64 - cx).powi(2)) < r * r;
        let rgb: Vec<[u8; 3]> = (0..rows * cols).map(|v| if disc(v) { [200, 40, (v % 13) as u8] } else { [30, 90 + (v % 7) as u8, 60] }).collect();
        write_rgb_png(&root.join(format!("imagesTr/d{i:02}_0000.png")), rows, cols, &rgb);
        let lab = natural_label(rows, cols, (0..rows * cols).map(|v| disc(v) as u8 as f32).collect());
        imageio::write(&root.join(format!("labelsTr/d{i:02}.png")), &lab, VoxelType::U8).unwrap();
    }
    std::fs::write(root.join("dataset.json"), r#"{"channel_names": {"0": "R", "1": "G", "2": "B"}, "labels": {"background": 0, "disc": 1}, "numTraining": 4, "file_ending": ".png"}"#).unwrap();
    let text = ok(segk(&["plan", root.to_str().unwrap()]));
    assert!(text.contains("segk trains nnUNetPlans' 2d as planned") && !text.contains("3d_fullres: patch"), "{text}");
    let plans: Value = serde_json::from_slice(&std::fs::read(base.join("segk_preprocessed/Dataset062_Disc/nnUNetPlans.json")).unwrap()).unwrap();
    assert_eq!(plans["image_reader_writer"], "NaturalImage2DIO");
    assert_eq!(plans["foreground_intensity_properties_per_channel"].as_object().map(|o| o.len()), Some(3), "three channels from one file");
    let text = ok(segk(&["--threads", "1", "train", root.to_str().unwrap(), "2d", "all", "--device", "cpu", "--epochs", "1", "--iters-per-epoch", "3", "--val-iters", "1", "--workers", "1"]));
    assert!(text.contains("validation: 4 cases"), "{text}");
    assert!(text.contains("threads: 1 compute threads (from --threads), 1 augmentation worker (from --workers)"), "{text}");
    let model = base.join("segk_results/Dataset062_Disc/segkTrainer__nnUNetPlans__2d");
    assert!(model.join("fold_all/validation/d03.png").is_file(), "validation writes PNG label maps");
    let pred = base.join("pred");
    let text = ok(segk(&["predict", "-i", root.join("imagesTr").to_str().unwrap(), "-o", pred.to_str().unwrap(), "-m", model.to_str().unwrap(), "--device", "cpu", "--no-tta"]));
    assert!(text.contains(" compute threads (from "), "{text}");
    for i in 0..4usize {
        let v = imageio::read(&pred.join(format!("d{i:02}.png"))).unwrap();
        assert_eq!(v.shape, [1, 40 + 2 * i, 48]);
        assert!(v.data.iter().all(|&x| x == 0.0 || x == 1.0));
    }
    ok(segk(&["evaluate", pred.to_str().unwrap(), root.join("labelsTr").to_str().unwrap()]));
    assert!(pred.join("summary.json").is_file());
    let _ = std::fs::remove_dir_all(&base);
}

fn natural_label(rows: usize, cols: usize, data: Vec<f32>) -> Volume {
    imageio::natural::picture(rows, cols, data)
}

/// A MetaImage case with an oblique direction and an origin, predicted by a model trained on
/// MetaImage: the label map is a .mha with exactly the input's geometry (SimpleITK's fields).
#[test]
fn a_metaimage_prediction_keeps_the_inputs_oblique_geometry() {
    let base = fresh("mha");
    let nii = base.join("src/Dataset063_Mha");
    ok(segk(&["synth", nii.to_str().unwrap(), "--cases", "2", "--shape", "16,20,24", "--spacing", "2,1,1"]));
    let root = base.join("Dataset063_Mha");
    convert(&nii, &root, ".mha");
    ok(segk(&["train", root.to_str().unwrap(), "3d_fullres", "all", "--device", "cpu", "--epochs", "1", "--iters-per-epoch", "2", "--val-iters", "1", "--workers", "1"]));
    let model = base.join("segk_results/Dataset063_Mha/segkTrainer__nnUNetPlans__3d_fullres");
    // The fixture's oblique geometry on a training image.
    let oblique = imageio::read(&fixtures().join("sitk_i16.mha")).unwrap();
    let Header::Itk(g) = oblique.header else { panic!("an ITK header") };
    let img = imageio::read(&root.join("imagesTr/case_0001_0000.mha")).unwrap();
    let input = base.join("in");
    std::fs::create_dir_all(&input).unwrap();
    imageio::write(&input.join("obl_0000.mha"), &g.clone().volume(img.shape, img.data.clone()), VoxelType::I16).unwrap();
    ok(segk(&["predict", "-i", input.to_str().unwrap(), "-o", base.join("pred").to_str().unwrap(), "-m", model.to_str().unwrap(), "--device", "cpu", "--no-tta"]));
    let out = imageio::read(&base.join("pred/obl.mha")).unwrap();
    assert_eq!(out.shape, img.shape);
    match out.header {
        Header::Itk(o) => assert_eq!(o, g, "the input's spacing, origin and direction, bit for bit"),
        other => panic!("{other:?}"),
    }
    let _ = std::fs::remove_dir_all(&base);
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn err(p: &Path) -> String {
    format!("{:#}", imageio::read_channels(p).expect_err("refused"))
}

/// Headers that lie, refused before anything is allocated for them, each with its reason;
/// and the less common header forms ITK reads, read as ITK reads them.
#[test]
fn hostile_and_unusual_headers_are_read_as_itk_reads_them_or_refused() {
    let dir = fresh("headers");
    std::fs::create_dir_all(&dir).unwrap();
    let mha = |extra: &str, data: &[u8]| [format!("ObjectType = Image\nNDims = 3\n{extra}ElementType = MET_UCHAR\nElementDataFile = LOCAL\n").as_bytes(), data].concat();
    // Sizes far beyond the file, or beyond any scan.
    let p = write(&dir, "huge.mha", &mha("DimSize = 100000 100000 100000\n", b"abc"));
    assert!(err(&p).contains("over segk's limit"), "{}", err(&p));
    let p = write(&dir, "short.mha", &mha("DimSize = 1000 1000 10\n", b"abc"));
    assert!(err(&p).contains("claims 10000000 bytes of voxel data, the file holds 3"), "{}", err(&p));
    let p = write(&dir, "bomb.mha", &mha("DimSize = 1000 1000 100\nCompressedData = True\n", &[0x78, 0x9c, 1, 2, 3]));
    assert!(err(&p).contains("more than 5 compressed bytes can hold"), "{}", err(&p));
    let p = write(&dir, "dev.mhd", b"NDims = 3\nDimSize = 100 100 100\nElementType = MET_UCHAR\nElementDataFile = /dev/zero\n");
    assert!(err(&p).contains("not a regular file"), "{}", err(&p));
    let p = write(&dir, "zero.mha", &mha("DimSize = 2 1 1\nElementSpacing = 0 1 1\n", &[1, 2]));
    assert!(err(&p).contains("not a positive size"), "{}", err(&p));
    let p = write(&dir, "skip.nrrd", b"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 2 1 1\nencoding: raw\nline skip: 18446744073709551615\n\nab");
    assert!(err(&p).contains("line skip"), "{}", err(&p));
    let p = write(&dir, "rgb.nrrd", b"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 3 2 1\nkinds: RGB-color domain domain\nencoding: raw\n\nabcdef");
    assert!(err(&p).contains("scalar images"), "{}", err(&p));
    // A PNG header claiming 65535 x 65535 pixels in a few bytes.
    let mut png_bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut png_bytes, 1, 1);
        enc.set_depth(png::BitDepth::Eight);
        enc.write_header().unwrap().write_image_data(&[7]).unwrap();
    }
    png_bytes[16..24].copy_from_slice(&[0, 0, 0xff, 0xff, 0, 0, 0xff, 0xff]);
    let crc = crc32(&png_bytes[12..29]);
    png_bytes[29..33].copy_from_slice(&crc.to_be_bytes());
    let p = write(&dir, "huge.png", &png_bytes);
    assert!(err(&p).contains("more than the file's compressed data can hold"), "{}", err(&p));

    // Forms ITK reads: trailing bytes, T for True, HeaderSize in a LOCAL file, a negative
    // spacing (the axis turned around), axis mins without a space, hex voxels.
    let read = |p: &Path| imageio::read_channels(p).unwrap();
    let v = read(&write(&dir, "trail.mha", &mha("DimSize = 2 1 1\n", &[1, 2, 99, 99])));
    assert_eq!(v.data, [1.0, 2.0]);
    let v = read(&write(&dir, "msb.mha", &[&b"NDims = 3\nDimSize = 1 1 1\nBinaryDataByteOrderMSB = T\nElementType = MET_SHORT\nElementDataFile = LOCAL\n"[..], &[1, 2]].concat()));
    assert_eq!(v.data, [258.0]);
    let head = b"NDims = 3\nDimSize = 2 1 1\nHeaderSize = 100\nElementType = MET_UCHAR\nElementDataFile = LOCAL\n";
    let mut bytes = head.to_vec();
    bytes.resize(100, b'#');
    bytes.extend([5, 6]);
    assert_eq!(read(&write(&dir, "hs.mha", &bytes)).data, [5.0, 6.0]);
    let v = read(&write(&dir, "neg.mha", &mha("DimSize = 2 1 1\nElementSpacing = -2 1 1\n", &[1, 2])));
    let Header::Itk(g) = &v.header else { panic!() };
    assert_eq!((g.spacing[0], g.direction[0][0]), (2.0, -1.0));
    let v = read(&write(&dir, "mins.nrrd", b"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 1 1 1\nspacings: 2 3 4\naxis mins: 10 20 30\nencoding: raw\n\na"));
    let Header::Itk(g) = &v.header else { panic!() };
    assert_eq!(g.origin, [11.0, 21.5, 32.0]);
    let v = read(&write(&dir, "hex.nrrd", b"NRRD0004\ntype: short\ndimension: 3\nsizes: 2 1 1\nendian: big\nencoding: hex\n\n0102 fffe\n"));
    assert_eq!(v.data, [258.0, -2.0]);

    // A 2D NRRD is written as SimpleITK writes one: a space dimension, no 3D space name.
    let v = read(&fixtures().join("sitk_2d_u8.nrrd"));
    let out = dir.join("two.nrrd");
    imageio::write(&out, &v, VoxelType::U8).unwrap();
    let text = String::from_utf8_lossy(&std::fs::read(&out).unwrap()).to_string();
    assert!(text.contains("\nspace dimension: 2\n") && !text.contains("\nspace:"), "{text}");
    let back = read(&out);
    assert_eq!((back.data, back.spacing), (v.data, v.spacing));

    // PNG as skimage reads it: a 1-bit mask as 0/1, 16-bit colour as its high byte.
    let png_of = |color: png::ColorType, depth: png::BitDepth, w: u32, data: &[u8]| {
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, w, 1);
        (enc.set_color(color), enc.set_depth(depth));
        enc.write_header().unwrap().write_image_data(data).unwrap();
        out
    };
    let v = read(&write(&dir, "mask.png", &png_of(png::ColorType::Grayscale, png::BitDepth::One, 8, &[0b1010_0000])));
    assert_eq!(v.data, [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    let v = read(&write(&dir, "rgb16.png", &png_of(png::ColorType::Rgb, png::BitDepth::Sixteen, 1, &[0x12, 0x34, 0xab, 0xcd, 0, 1])));
    assert_eq!(v.data, [18.0, 171.0, 0.0]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// PNG's CRC-32 (of chunk type and data), to forge a header chunk.
fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 == 1 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

/// The tiff crate computes a planar-separate page's strip count in u32 and overflows on these
/// fuzzer-found files (a panic under the fuzzer's overflow checks): segk refuses them first.
#[test]
fn tiff_pages_with_more_strips_than_u32_are_refused_before_the_crate() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz_regressions/tiff");
    for name in ["strip_count_overflow.bin", "strip_count_overflow_2.bin"] {
        let bytes = std::fs::read(dir.join(name)).unwrap();
        let e = segk::imageio::tiff::check_strip_counts(&mut std::io::Cursor::new(&bytes)).unwrap_err().to_string();
        assert!(e.contains("more strips than a TIFF can index"), "{name}: {e}");
    }
    // Every TIFF fixture nnU-Net's writers made passes the check.
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/image_formats");
    for entry in std::fs::read_dir(&fixtures).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "tif" || e == "tiff") {
            let bytes = std::fs::read(&p).unwrap();
            segk::imageio::tiff::check_strip_counts(&mut std::io::Cursor::new(&bytes)).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        }
    }
}
