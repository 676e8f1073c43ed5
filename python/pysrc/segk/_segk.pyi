"""Type stubs of segk's compiled module."""

from os import PathLike
from typing import Optional, Sequence, Tuple, Union, overload, Literal

import numpy as np
import numpy.typing as npt

__version__: str

class Predictor:
    """A trained model loaded once on a device, predicting numpy arrays in memory.

    model: a model folder as `segk predict -m` takes it: segk's (segkTrainer__PLANS__CONFIGURATION)
    or nnU-Net's own (nnUNetTrainer__nnUNetPlans__3d_fullres, with checkpoint_final.pth).
    folds: the folds to average ("0".."4", "all"); default every fold_* folder.
    checkpoint: checkpoint_final, checkpoint_best or checkpoint_latest.
    device: "auto" (GPU 0 when usable, else the CPU), "cpu", "cuda" or "cuda:N".
    step: the sliding window's step as a fraction of the patch (nnU-Net's step_size).
    tta: mirror test-time augmentation (nnU-Net's default; 8x the work in 3D).
    threads: compute threads (default: SEGK_THREADS, else OMP_NUM_THREADS, else every usable CPU).
    precision: what the convolutions multiply: "auto" (bf16 on a GPU and on a CPU with AVX512-BF16,
        else f32), "f32" (CPU only) or "bf16".

    Raises RuntimeError with segk's message when the folder is not a model or cannot be loaded.
    """

    def __init__(
        self,
        model: Union[str, PathLike[str]],
        folds: Optional[Sequence[str]] = None,
        checkpoint: str = "checkpoint_final",
        device: str = "auto",
        step: float = 0.5,
        tta: bool = True,
        threads: Optional[int] = None,
        precision: str = "auto",
    ) -> None: ...
    @property
    def description(self) -> str:
        """What was loaded (configuration, folds, checkpoint) and on which device."""
    @property
    def channels(self) -> int:
        """Input channels the model takes."""
    @property
    def labels(self) -> npt.NDArray[np.int16]:
        """Every label value a prediction may hold."""
    @overload
    def predict(self, image: npt.ArrayLike, spacing: Tuple[float, float, float], probabilities: Literal[False] = False) -> npt.NDArray[np.generic]: ...
    @overload
    def predict(self, image: npt.ArrayLike, spacing: Tuple[float, float, float], probabilities: Literal[True]) -> Tuple[npt.NDArray[np.generic], npt.NDArray[np.float32]]: ...
    def predict(self, image: npt.ArrayLike, spacing: Tuple[float, float, float], probabilities: bool = False):
        """Predicts one image.

        image: (channels, z, y, x), or (z, y, x) for a one-channel model, in nnU-Net's axis order
        (what its readers and SimpleITK's GetArrayFromImage return); any real dtype.
        spacing: (z, y, x) in mm, nnU-Net's props['spacing'].
        Returns the label map (z, y, x; uint8 when every label value fits, else int16) and, with
        probabilities=True, also the class (or region) probabilities (outputs, z, y, x), float32.
        Raises ValueError for an image of the wrong kind or shape, RuntimeError for segk's errors.
        The GIL is released while segk computes.
        """
