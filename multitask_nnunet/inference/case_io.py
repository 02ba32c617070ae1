"""Reading, preprocessing and writing one case: the CPU work of the one-case predictor (case_predictor.py), which
batch prediction runs in background threads while the network runs.

Threads, not processes: they start at once and share the arrays, and the heavy parts (SimpleITK reading and
writing, scipy/scikit-image resampling) release the GIL; measured: while a thread resamples a 64x180x236
volume (1.8 s), the main thread always gets the GIL back within the 5 ms switch interval.

Reading is the plans' image reader and preprocessing nnU-Net's own (``preprocessor_class().run_case_npy``,
which is what ``run_case`` runs after reading), with one thing left out: at inference nnU-Net's preprocessor
still resamples the segmentation it is given, and without one, the nonzero mask of its cropping, only for
the result to be thrown away; ``InferenceConfiguration`` hands it a resampling that returns that mask as it
is. The preprocessed image is the same. With a ``device``, normalisation and resampling run there instead
(device_preprocessing.py).

Anything that goes wrong reading a case is an ``InputError`` naming the file: the reader's errors are traced
to the file by reading each channel alone, and non-finite values (NaN, inf) to the channel's file. NIfTI
needs a look of its own: its C library (inside SimpleITK) silently turns NaN and inf into 0 when reading, so
float NIfTI files are checked with nibabel before reading (integer images cannot hold NaN and are not read
twice), and it fills the missing voxels of a truncated file with 0, so every NIfTI file is first checked to be
complete (``multitask_nnunet.io.nifti``).
"""
from typing import TYPE_CHECKING, Optional, Sequence, Tuple, Union

import nibabel
import numpy as np
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from multitask_nnunet.io.atomic import atomic_path
from multitask_nnunet.errors import InputError, one_line
from multitask_nnunet.inference.configuration import InferenceConfiguration
from multitask_nnunet.io.nifti import check_complete

if TYPE_CHECKING:
    import torch


class CaseIO:
    """``device``: where a case is normalised and resampled (device_preprocessing.py); None, or a configuration
    that it does not support: nnU-Net's CPU preprocessing. ``on_device`` says which runs."""

    def __init__(self, plans_manager: PlansManager, configuration_manager: ConfigurationManager, dataset_json: dict,
                 device=None):
        self.plans_manager = plans_manager
        self.configuration_manager = InferenceConfiguration(configuration_manager.configuration)
        self.dataset_json = dataset_json
        self.num_channels = len(dataset_json["channel_names"])
        self.device = None
        if device is not None:
            from multitask_nnunet.inference import device_preprocessing
            if device_preprocessing.supported(self.configuration_manager):
                self.device = device
                self.configuration_manager = device_preprocessing.DeviceConfiguration(
                    configuration_manager.configuration, device)
                self._device_preprocessor = device_preprocessing.DevicePreprocessor(device)

    @property
    def on_device(self) -> bool:
        return self.device is not None

    def read(self, name: str, files: Sequence[str]) -> Tuple[np.ndarray, dict]:
        """The image (c, *spatial) as the plans' reader returns it, and its properties."""
        for file in files:
            check_complete(file)
            _check_float_nifti_is_finite(file)
        try:
            image, properties = self.plans_manager.image_reader_writer_class().read_images(list(files))
        except Exception as e:
            raise self._reading_error(name, files, e) from None
        if image.shape[0] != len(files):
            raise InputError(f"case '{name}': {len(files)} image file(s) hold {image.shape[0]} channels; the model "
                             f"expects one channel per file ({', '.join(files)})")
        dimension = _image_dimension(properties)
        model_dimension = len(self.configuration_manager.patch_size)
        if dimension is not None and dimension < model_dimension:
            raise InputError(f"case '{name}' ({', '.join(files)}): a {dimension}d image; the model is "
                             f"{model_dimension}d and needs {model_dimension}d images")
        return image, properties

    def preprocess(self, image: np.ndarray, properties: dict, name: str,
                   files: Optional[Sequence[str]] = None) -> Tuple[Union[np.ndarray, "torch.Tensor"], dict]:
        """nnU-Net-preprocessed data (c, x, y, z) float32 and the properties its export needs: a numpy array, or
        with ``on_device`` a tensor on the device. ``properties`` is not changed (nnU-Net adds its cropping and
        shapes to a copy). ``files``: to name in errors."""
        source = f"case '{name}' ({', '.join(files)})" if files else f"case '{name}' (image array)"
        if image.shape[0] != self.num_channels:
            raise InputError(f"{source}: {image.shape[0]} channel(s); the model expects {self.num_channels}")
        if "spacing" not in properties or len(properties["spacing"]) != image.ndim - 1:
            raise InputError(f"{source}: properties need 'spacing' with one entry per spatial axis of the image "
                             f"{tuple(image.shape[1:])}")
        preprocessor = self._device_preprocessor if self.on_device else \
            self.configuration_manager.preprocessor_class(verbose=False)
        try:
            data, _, properties = preprocessor.run_case_npy(image, None, dict(properties), self.plans_manager,
                                                            self.configuration_manager, self.dataset_json)
        except Exception as e:
            raise InputError(f"{source}: preprocessing failed ({one_line(e)})") from None
        finite = data.flatten(1).isfinite().all(1).tolist() if self.on_device else \
            [np.isfinite(data[channel]).all() for channel in range(data.shape[0])]
        for channel, ok in enumerate(finite):
            if not ok:
                raise InputError(_NOT_FINITE.format(files[channel] if files else f"{source}, channel {channel}"))
        return (data if self.on_device else data.astype(np.float32, copy=False)), properties

    def _reading_error(self, name: str, files: Sequence[str], error: Exception) -> InputError:
        reader = self.plans_manager.image_reader_writer_class()
        geometry = []
        for file in files:
            try:
                image, properties = reader.read_images([file])
            except Exception as e:
                return InputError(f"{file}: cannot read image ({one_line(e)})")
            if image.shape[0] != 1:
                return InputError(f"{file}: holds {image.shape[0]} channels (array shape {image.shape[1:]} each); "
                                  f"the model expects one 3d image per channel file")
            geometry.append(f"{file}: shape {image.shape[1:]}, spacing {properties['spacing']}")
        if len(files) > 1:
            return InputError(f"case '{name}': channel images do not match ({'; '.join(geometry)})")
        return InputError(f"case '{name}' ({files[0]}): cannot read image ({one_line(error)})")

    def write_mask(self, segmentation: np.ndarray, properties: dict, path: str) -> None:
        """The mask via the plans' reader/writer (the input's geometry), to a temporary file then renamed."""
        with atomic_path(path, suffix=self.dataset_json["file_ending"]) as tmp:
            self.plans_manager.image_reader_writer_class().write_seg(segmentation, tmp, properties)

    def write_map(self, values: np.ndarray, properties: dict, path: str) -> None:
        """A float32 map in the input's array shape (saliency, uncertainty) with the input's geometry, atomically.
        The plans' writers cast to integer labels, so this writes the float image itself with the geometry they
        keep: SimpleITK's ``sitk_stuff`` (spacing, origin, direction) or nibabel's ``nibabel_stuff`` (affine)."""
        values = np.asarray(values, dtype=np.float32)
        with atomic_path(path, suffix=self.dataset_json["file_ending"]) as tmp:
            if "sitk_stuff" in properties:
                import SimpleITK as sitk
                geometry = properties["sitk_stuff"]
                image = sitk.GetImageFromArray(values[0] if len(geometry["spacing"]) == 2 else values)
                image.SetSpacing(geometry["spacing"])
                image.SetOrigin(geometry["origin"])
                image.SetDirection(geometry["direction"])
                sitk.WriteImage(image, tmp, True)
            elif "nibabel_stuff" in properties:  # NibabelIO's axis order (its write_seg, nnunetv2 2.8.1)
                nibabel.save(nibabel.Nifti1Image(values.transpose((2, 1, 0)),
                                                 affine=properties["nibabel_stuff"]["original_affine"]), tmp)
            else:
                raise InputError(f"{path}: maps are written for SimpleITK or nibabel readers only (this model's "
                                 f"reader: {self.plans_manager.image_reader_writer_class.__name__})")

    def read_image(self, files: Sequence[str]) -> Tuple[np.ndarray, dict]:
        """The image as the plans' reader returns it (for figures), without the checks of ``read``."""
        return self.plans_manager.image_reader_writer_class().read_images(list(files))


_NOT_FINITE = "{}: image contains NaN or infinite values"


def _image_dimension(properties: dict):
    """The dimension of the image file as stored, where the reader says (SimpleITK's: nnU-Net reads a 2d image as
    one slice of a volume with a spacing of 999); None where it does not."""
    sitk_stuff = properties.get("sitk_stuff")
    return len(sitk_stuff["spacing"]) if sitk_stuff and "spacing" in sitk_stuff else None


def _check_float_nifti_is_finite(file: str) -> None:
    if not file.endswith((".nii", ".nii.gz")):
        return
    try:
        image = nibabel.load(file)
        finite = image.get_data_dtype().kind != "f" or np.isfinite(np.asanyarray(image.dataobj)).all()
    except Exception:  # not readable by nibabel: the image reader says what is wrong with it
        return
    if not finite:
        raise InputError(_NOT_FINITE.format(file))
