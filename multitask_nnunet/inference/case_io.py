"""Reading + preprocessing a case and writing its mask: the CPU work that batch prediction runs in background
threads while the network runs.

Threads, not processes: they start at once and share the arrays, and the heavy parts (SimpleITK reading and
writing, scipy/scikit-image resampling) release the GIL; measured: while a thread resamples a 64x180x236
volume (1.8 s), the main thread always gets the GIL back within the 5 ms switch interval.

Preprocessing is nnU-Net's own (``configuration_manager.preprocessor_class().run_case``). Anything that goes
wrong reading a case is an ``InputError`` naming the file: the reader's errors are traced to the file by
reading each channel alone, and non-finite values (NaN, inf) to the channel's file. NIfTI needs a look of
its own: its C library (inside SimpleITK) silently turns NaN and inf into 0 when reading, so float NIfTI
files are checked with nibabel before preprocessing (integer images cannot hold NaN and are not read twice).
"""
from typing import Tuple

import nibabel
import numpy as np
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from multitask_nnunet.atomic import atomic_path
from multitask_nnunet.errors import InputError
from multitask_nnunet.inference.cases import Case


class CaseIO:
    def __init__(self, plans_manager: PlansManager, configuration_manager: ConfigurationManager, dataset_json: dict):
        self.plans_manager = plans_manager
        self.configuration_manager = configuration_manager
        self.dataset_json = dataset_json

    def read_and_preprocess(self, case: Case) -> Tuple[np.ndarray, dict]:
        """nnU-Net-preprocessed data (c, x, y, z) float32 and the properties its export needs."""
        for file in case.files:
            _check_float_nifti_is_finite(file)
        preprocessor = self.configuration_manager.preprocessor_class(verbose=False)
        try:
            data, _, properties = preprocessor.run_case(list(case.files), None, self.plans_manager,
                                                        self.configuration_manager, self.dataset_json)
        except Exception as e:
            raise self._reading_error(case, e) from None
        if data.shape[0] != len(case.files):
            raise InputError(f"case '{case.name}': {len(case.files)} image file(s) hold {data.shape[0]} channels; "
                             f"the model expects one channel per file ({', '.join(case.files)})")
        for channel, file in enumerate(case.files):
            if not np.isfinite(data[channel]).all():
                raise InputError(_NOT_FINITE.format(file))
        return data.astype(np.float32, copy=False), properties

    def _reading_error(self, case: Case, error: Exception) -> InputError:
        reader = self.plans_manager.image_reader_writer_class()
        geometry = []
        for file in case.files:
            try:
                image, properties = reader.read_images([file])
            except Exception as e:
                return InputError(f"{file}: cannot read image ({_one_line(e)})")
            if image.shape[0] != 1:
                return InputError(f"{file}: holds {image.shape[0]} channels (array shape {image.shape[1:]} each); "
                                  f"the model expects one 3d image per channel file")
            geometry.append(f"{file}: shape {image.shape[1:]}, spacing {properties['spacing']}")
        if len(case.files) > 1:
            return InputError(f"case '{case.name}': channel images do not match ({'; '.join(geometry)})")
        return InputError(f"case '{case.name}' ({case.files[0]}): preprocessing failed ({_one_line(error)})")

    def write_mask(self, segmentation: np.ndarray, properties: dict, path: str) -> None:
        """The mask via the plans' reader/writer (the input's geometry), to a temporary file then renamed."""
        with atomic_path(path, suffix=self.dataset_json["file_ending"]) as tmp:
            self.plans_manager.image_reader_writer_class().write_seg(segmentation, tmp, properties)


_NOT_FINITE = "{}: image contains NaN or infinite values"


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


def _one_line(error: Exception) -> str:
    """The informative line of a (SimpleITK: multi-line, source location first) error message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    errors = [line for line in lines if "ERROR" in line]
    return f"{type(error).__name__}: {(errors or lines)[-1]}" if lines else type(error).__name__
