"""The installed wheel, in a venv with no Rust: the `segk` command and `import segk`.

Run by .ci/run after `pip install` of the wheel (scripts/build-wheel.sh):
    python python/tests/test_wheel.py
Uses nnU-Net's own small 3d_fullres model (tests/fixtures/nnunet_model/plain, made by nnU-Net
2.8.1) and its test images; needs numpy only.
"""

import gzip
import os
import shutil
import struct
import subprocess
import sys
import tempfile

import numpy as np

import segk

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "..", "tests", "fixtures", "nnunet_model")
MODEL = os.path.join(FIXTURES, "plain", "nnUNetTrainer__nnUNetPlans__3d_fullres")
IMAGES = os.path.join(FIXTURES, "imagesTs")

NIFTI_TYPES = {2: np.uint8, 4: np.int16, 8: np.int32, 16: np.float32, 64: np.float64, 256: np.int8, 512: np.uint16, 768: np.uint32}


def read_nifti(path):
    """A NIfTI-1 file as nnU-Net's readers give it: the array (z, y, x) and spacing (z, y, x)."""
    raw = gzip.open(path).read() if path.endswith(".gz") else open(path, "rb").read()
    dim = struct.unpack_from("<8h", raw, 40)
    datatype = struct.unpack_from("<h", raw, 70)[0]
    pixdim = struct.unpack_from("<8f", raw, 76)
    offset = int(struct.unpack_from("<f", raw, 108)[0])
    slope, inter = struct.unpack_from("<2f", raw, 112)
    n = dim[0]
    shape = tuple(dim[1 : 1 + n])
    data = np.frombuffer(raw, dtype=NIFTI_TYPES[datatype], count=int(np.prod(shape)), offset=offset)
    data = data.reshape(shape[::-1])  # x fastest on disk: (z, y, x) in C order
    if slope not in (0.0, 1.0) or inter != 0.0:
        data = data * slope + inter
    return data, tuple(float(p) for p in pixdim[1 : 1 + n][::-1])


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print("ok:", what)


def main():
    check(shutil.which("cargo") is None and shutil.which("rustc") is None, "no Rust on PATH")
    exe = shutil.which("segk")
    check(exe is not None, "the wheel put `segk` on PATH")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout
    check(version.startswith("segk " + segk.__version__), f"`segk --version` ({version.split()[1]}) is the module's ({segk.__version__})")
    with tempfile.TemporaryDirectory() as tmp:
        demo = subprocess.run([exe, "demo", "--epochs", "1", "--iters", "2", "--threads", "2"], capture_output=True, text=True, cwd=tmp)
    check(demo.returncode == 0 and "Dice" in demo.stdout, "the demo runs from the wheel's binary")

    p = segk.Predictor(MODEL, folds=["0"], device="cpu", tta=False, threads=2)
    check("3d_fullres" in p.description and p.channels == 1, f"model loaded: {p.description}")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "pred")
        subprocess.run([exe, "predict", "-i", IMAGES, "-o", out, "-m", MODEL, "-f", "0", "--device", "cpu", "--no-tta"], check=True, capture_output=True)
        for name in sorted(os.listdir(IMAGES)):
            case = name[: -len("_0000.nii.gz")]
            image, spacing = read_nifti(os.path.join(IMAGES, name))
            want, _ = read_nifti(os.path.join(out, case + ".nii.gz"))
            got = p.predict(image, spacing)
            check(got.shape == image.shape and got.dtype == np.uint8, f"{case}: labels {got.shape} {got.dtype}")
            check(np.array_equal(got, want), f"{case}: labels equal to `segk predict` on the file")
            labels, probs = p.predict(image[None].astype(np.float64), spacing, probabilities=True)
            check(np.array_equal(labels, want), f"{case}: a float64 (1, z, y, x) array gives the same labels")
            check(probs.dtype == np.float32 and probs.shape == (len(p.labels),) + image.shape, f"{case}: probabilities {probs.shape}")
            check(np.allclose(probs.sum(axis=0), 1.0, atol=1e-4) and np.array_equal(p.labels[probs.argmax(axis=0)], labels), f"{case}: probabilities sum to 1, argmax is the label map")

    def raises(kind, fragment, f):
        try:
            f()
        except kind as e:
            check(fragment in str(e), f"{kind.__name__}: {e}")
            return
        raise AssertionError(f"expected {kind.__name__} with {fragment!r}")

    image, spacing = read_nifti(os.path.join(IMAGES, sorted(os.listdir(IMAGES))[0]))
    raises(ValueError, "real numbers", lambda: p.predict(image.astype(np.complex64), spacing))
    raises(ValueError, "real numbers", lambda: p.predict("not an image", spacing))
    raises(ValueError, "takes 1 channel(s), the image has 2", lambda: p.predict(np.stack([image, image]), spacing))
    raises(ValueError, "got 2 dimensions", lambda: p.predict(image[0], spacing))
    raises(RuntimeError, "spacing must be positive", lambda: p.predict(image, (0.0, 1.0, 1.0)))
    raises(RuntimeError, "non-finite", lambda: p.predict(np.full(image.shape, np.nan, np.float32), spacing))
    raises(RuntimeError, "not a model folder", lambda: segk.Predictor(os.path.join(FIXTURES, "imagesTs")))
    raises(RuntimeError, "fold 7 is not trained", lambda: segk.Predictor(MODEL, folds=["7"], device="cpu"))
    raises(ValueError, "threads must be at least 1", lambda: segk.Predictor(MODEL, threads=0))
    print("all checks passed")


if __name__ == "__main__":
    sys.exit(main())
