//! `import segk`: a model folder loaded once, numpy arrays predicted in memory, with the same
//! preprocessing, sliding window, folds, mirroring and export as `segk predict`.

use numpy::{IntoPyArray, PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use segk::predict::session::{Request, Session, SessionOptions};

/// segk's errors as Python exceptions, with segk's whole message (its causes included).
fn runtime(e: anyhow::Error) -> PyErr {
    PyRuntimeError::new_err(format!("{e:#}"))
}

/// A trained model (segk's model folder, or nnU-Net's: `TRAINER__PLANS__CONFIGURATION`) loaded
/// on a device, predicting numpy arrays.
#[pyclass(module = "segk", frozen)]
struct Predictor {
    session: Session,
}

#[pymethods]
impl Predictor {
    #[new]
    #[pyo3(signature = (model, folds=None, checkpoint="checkpoint_final", device="auto", step=0.5, tta=true, threads=None, precision="auto"))]
    #[allow(clippy::too_many_arguments)]
    fn new(py: Python<'_>, model: std::path::PathBuf, folds: Option<Vec<String>>, checkpoint: &str, device: &str, step: f64, tta: bool, threads: Option<usize>, precision: &str) -> PyResult<Predictor> {
        if threads == Some(0) {
            return Err(PyValueError::new_err("threads must be at least 1"));
        }
        let precision = segk::device::Precision::parse(precision).map_err(|e| PyValueError::new_err(e.to_string()))?;
        let o = SessionOptions { folds, checkpoint: checkpoint.to_string(), device: device.to_string(), step, tta, threads, precision };
        let session = py.detach(|| Session::open(&model, o)).map_err(runtime)?;
        Ok(Predictor { session })
    }

    /// What was loaded, on which device.
    #[getter]
    fn description(&self) -> String {
        self.session.description.clone()
    }

    /// Input channels the model takes.
    #[getter]
    fn channels(&self) -> usize {
        self.session.channels
    }

    /// The label values a prediction may hold.
    #[getter]
    fn labels<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i16>> {
        self.session.label_values.clone().into_pyarray(py)
    }

    /// Predicts one image: `image` as (channels, z, y, x), or (z, y, x) for one channel, in
    /// nnU-Net's axis order (what its readers and SimpleITK's GetArrayFromImage give), and
    /// `spacing` as (z, y, x), nnU-Net's props['spacing']. Returns the label map (z, y, x), and
    /// with `probabilities=True` also the probabilities (outputs, z, y, x) as float32.
    #[pyo3(signature = (image, spacing, probabilities=false))]
    fn predict<'py>(&self, py: Python<'py>, image: &Bound<'py, PyAny>, spacing: (f64, f64, f64), probabilities: bool) -> PyResult<Bound<'py, PyAny>> {
        let array: PyReadonlyArrayDyn<'py, f32> = match image.extract() {
            Ok(a) => a,
            Err(_) => {
                // Any real dtype is converted, as nnU-Net's readers cast to float32.
                let np = py.import("numpy")?;
                let is_array = image.is_instance(&np.getattr("ndarray")?)?;
                let kind: String = if is_array { image.getattr("dtype")?.getattr("kind")?.extract()? } else { String::new() };
                if !is_array || !matches!(kind.as_str(), "f" | "i" | "u" | "b") {
                    let what = if is_array { format!("an array of dtype {}", image.getattr("dtype")?.str()?) } else { format!("a {}", image.get_type().name()?) };
                    return Err(PyValueError::new_err(format!("image must be a numpy array of real numbers (float32 best), got {what}")));
                }
                np.call_method1("ascontiguousarray", (image, "float32"))?.extract()?
            }
        };
        let shape = array.shape().to_vec();
        let (channels, dims) = match shape.len() {
            3 => (1, [shape[0], shape[1], shape[2]]),
            4 => (shape[0], [shape[1], shape[2], shape[3]]),
            n => return Err(PyValueError::new_err(format!("image must be (channels, z, y, x) or (z, y, x), got {n} dimensions {shape:?}"))),
        };
        if channels != self.session.channels {
            return Err(PyValueError::new_err(format!("the model takes {} channel(s), the image has {channels} (shape {shape:?}; give (channels, z, y, x))", self.session.channels)));
        }
        let voxels: usize = dims.iter().product();
        let flat: Vec<f32> = match array.as_slice() {
            Ok(s) => s.to_vec(),
            Err(_) => array.as_array().iter().copied().collect(),
        };
        let per_channel: Vec<Vec<f32>> = flat.chunks(voxels.max(1)).map(<[f32]>::to_vec).collect();
        drop(flat);
        let request = Request { channels: per_channel, shape: dims, spacing: [spacing.0, spacing.1, spacing.2], probabilities };
        let out = py.detach(|| self.session.predict(request)).map_err(runtime)?;
        // uint8 where every label value fits, as nnU-Net's label maps; else int16.
        let small = self.session.label_values.iter().all(|&v| (0..=255).contains(&v));
        let labels = match small {
            true => out.labels.into_iter().map(|v| v as u8).collect::<Vec<u8>>().into_pyarray(py).reshape(dims.to_vec())?.into_any(),
            false => out.labels.into_pyarray(py).reshape(dims.to_vec())?.into_any(),
        };
        match out.probabilities {
            None => Ok(labels),
            Some(p) => {
                let probs: Bound<'py, PyArrayDyn<f32>> = p.into_pyarray(py).reshape(vec![self.session.outputs, dims[0], dims[1], dims[2]])?;
                Ok((labels, probs).into_pyobject(py)?.into_any())
            }
        }
    }
}

#[pymodule]
fn _segk(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Predictor>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
