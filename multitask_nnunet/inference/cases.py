"""Which cases an input folder holds, which of them this part predicts, and which are already done.

Inputs follow nnU-Net's channel naming ``<case>_XXXX<ending>`` (XXXX = channel index, 4 digits); the case's
output name is ``<case><ending>`` (mask file and CSV ``Names``). Naming problems are found here, from file
names alone, so that they fail before the model is loaded; each is reported for its case (or, if the name
has no case, for the file), so that ``--continue-on-error`` can predict the other cases.
"""
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from multitask_nnunet.errors import InputError
from multitask_nnunet.io.nifti import channel_gaps, channel_pattern, describe_channels


SALIENCY, POOLING, SEG_UNCERTAINTY = "_saliency", "_pooling", "_seg_uncertainty"  # suffixes of the extra outputs


@dataclass(frozen=True)
class InputCase:
    """A case of the folder being predicted (``predict``): its channel images."""
    name: str                   # e.g. quiz_037
    files: Tuple[str, ...]      # one image per channel, channel order
    file_ending: str            # e.g. .nii.gz

    @property
    def output_name(self) -> str:
        return self.name + self.file_ending

    def extra_output_names(self, saliency: bool = False, seg_uncertainty: bool = False) -> List[str]:
        """The files ``predict --saliency`` / ``--seg-uncertainty`` add for this case (the guided head's
        ``<case>_pooling<ending>`` too, which is written before these and not counted)."""
        names = [self.name + SALIENCY + self.file_ending, self.name + SALIENCY + ".png"] if saliency else []
        return names + ([self.name + SEG_UNCERTAINTY + self.file_ending] if seg_uncertainty else [])

    @property
    def pooling_name(self) -> str:
        return self.name + POOLING + self.file_ending


def list_cases(folder: str, file_ending: str, channel_names: Dict[str, str]) -> Tuple[List[InputCase], Dict[str, str]]:
    """(valid cases sorted by name, {case or file name: problem}) for the images in ``folder`` that end in
    ``file_ending``; other files are ignored, as nnU-Net does."""
    if not os.path.isdir(folder):
        raise InputError(f"input folder {folder} does not exist")
    pattern = channel_pattern(file_ending)
    channels: Dict[str, Dict[int, str]] = {}
    problems: Dict[str, str] = {}
    images = [f for f in os.listdir(folder)  # hidden files are left out: e.g. atomic writes' .tmp_ files
              if f.endswith(file_ending) and not f.startswith(".") and os.path.isfile(os.path.join(folder, f))]
    for file in sorted(images):
        match = pattern.fullmatch(file)
        if match is None:
            problems[file[:-len(file_ending)]] = (
                f"{os.path.join(folder, file)}: not named <case>_XXXX{file_ending} (nnU-Net channel naming, "
                f"e.g. {file[:-len(file_ending)]}_0000{file_ending} for channel 0)")
        else:
            channels.setdefault(match.group(1), {})[int(match.group(2))] = os.path.join(folder, file)
    expected = len(channel_names)
    described = describe_channels(channel_names)
    cases = []
    for name, files in sorted(channels.items()):
        missing_channels, extra_channels = channel_gaps(files, expected)
        missing = [f"{name}_{c:04d}{file_ending}" for c in missing_channels]
        extra = [os.path.basename(files[c]) for c in extra_channels]
        if missing or extra:
            what = "; ".join(([f"missing {', '.join(missing)}"] if missing else []) +
                             ([f"unexpected {', '.join(extra)}"] if extra else []))
            problems[name] = (f"case '{name}' in {folder}: {what} (the model expects {expected} channel(s): "
                              f"{described})")
        else:
            cases.append(InputCase(name, tuple(files[c] for c in range(expected)), file_ending))
    if not cases and not problems:
        raise InputError(f"input folder {folder}: no images named <case>_0000{file_ending}")
    return cases, problems


def part_of(names: Sequence[str], num_parts: int, part_id: int) -> List[str]:
    """Every ``num_parts``-th name of the sorted list, starting at ``part_id`` (nnU-Net's -num_parts/-part_id)."""
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise InputError(f"--part-id {part_id} --num-parts {num_parts}: need num-parts >= 1 and "
                         f"0 <= part-id < num-parts")
    return sorted(names)[part_id::num_parts]


def is_done(case: InputCase, output_folder: str, class_rows: Dict[str, object], extra_outputs: Sequence[str] = (),
            extra_columns: Optional[Dict[str, Dict[str, float]]] = None, required_columns: Sequence[str] = ()) -> bool:
    """Done = its mask and the ``extra_outputs`` asked for exist and its row is in the class CSVs (with the
    ``required_columns`` filled in ``extra_columns``); all are written atomically, so all complete."""
    if case.output_name not in class_rows or not all(
            os.path.isfile(os.path.join(output_folder, f)) for f in (case.output_name, *extra_outputs)):
        return False
    return all(c in (extra_columns or {}).get(case.output_name, {}) for c in required_columns)
