"""segk: train and run nnU-Net-style U-Nets, one binary, CPU or CUDA.

The `segk` command (installed with this package) runs nnU-Net's whole pipeline; this module
predicts numpy arrays with a trained model, in memory:

    import segk
    p = segk.Predictor("results/Dataset001_X/segkTrainer__nnUNetPlans__3d_fullres", folds=["0"])
    labels = p.predict(image, spacing=(3.0, 0.8, 0.8))       # image: (channels, z, y, x)
    labels, probabilities = p.predict(image, spacing, probabilities=True)
"""

from ._segk import Predictor, __version__

__all__ = ["Predictor", "__version__"]
