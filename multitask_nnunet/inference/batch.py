"""``multitask-nnunet predict``: segment and classify every case of a folder with one trained model.

Writes ``OUT_DIR/<case><ending>`` (label map in the input image's geometry, nnU-Net's export) and one row per
case in ``OUT_DIR/subtype_results.csv`` (``Names,Subtype``) and ``class_probabilities.csv``.

How it runs, with the model loaded once:

- background threads read and preprocess the next cases (nnU-Net's preprocessor from the plans) and write
  finished masks (case_io.py) while the main thread runs the network (whole volume when it fits, sliding
  window otherwise: predictor.py) and turns logits into the label map (export.py);
- resumable: a case whose mask exists and whose row is in the CSVs is skipped unless ``--overwrite``. Masks
  and CSVs are written atomically, the CSVs after every finished case and merged with the rows already on
  disk (class_rows.py), so a crash loses no finished case;
- sharding: ``--num-parts N --part-id I`` predicts every N-th case of the sorted input, as nnU-Net does.
  Parts may share OUT_DIR: each keeps its rows in ``OUT_DIR/parts/part_I/``; the part that finds every case
  of the input done writes the merged CSVs. Any later run into OUT_DIR (e.g. without ``--num-parts``; it
  skips the finished cases) merges as well;
- bad input raises ``InputError`` naming the file; with ``--continue-on-error`` the other cases are still
  predicted, every failure is reported at the end, one line each, and the exit status is 1.

Python API: ``predict_folder(...) -> PredictionReport``.
"""
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional, Sequence, Union

from batchgenerators.utilities.file_and_folder_operations import load_json
from tqdm import tqdm

from multitask_nnunet.class_labels import read_class_labels
from multitask_nnunet.errors import InputError
from multitask_nnunet.inference.cases import Case, is_done, list_cases, part_of
from multitask_nnunet.inference.class_rows import ClassRows, known_rows
from multitask_nnunet.inference.model_folder import DEFAULT_PLANS, DEFAULT_TRAINER, resolve_folds, resolve_model_folder

__all__ = ["predict_folder", "PredictionReport", "add_parser"]

DEFAULT_WORKERS = max(1, min(3, (os.cpu_count() or 2) - 1))


@dataclass
class PredictionReport:
    output_folder: str
    predicted: List[str] = field(default_factory=list)       # cases predicted by this run
    skipped: List[str] = field(default_factory=list)         # cases already done before this run
    failed: Dict[str, str] = field(default_factory=dict)     # case (or file) name -> message
    merged: bool = False                                     # merged CSVs hold every case of the input
    seconds: float = 0.0                                     # wall time of the prediction loop


def predict_folder(input_dir, output_dir, model_dir, folds: Optional[Sequence[Union[int, str]]] = None,
                   checkpoint: str = "checkpoint_final.pth", device: Optional[str] = None, tta: bool = False,
                   mode: str = "auto", max_whole_voxels: Optional[int] = None, overwrite: bool = False,
                   num_parts: int = 1, part_id: int = 0, continue_on_error: bool = False,
                   workers: int = DEFAULT_WORKERS, progress: bool = True) -> PredictionReport:
    """Predict every case of ``input_dir`` (nnU-Net channel naming) into ``output_dir``; see the module
    docstring. ``folds`` None: every fold with ``checkpoint``. ``device`` None: cuda if available, else cpu.
    ``tta``: mirroring. ``mode``: auto | whole | sliding; ``max_whole_voxels``: largest preprocessed volume
    that auto mode runs in one pass (None: the predictor's default). Raises ``InputError`` on the first bad
    case unless ``continue_on_error``, in which case failures are in the report."""
    if workers < 1:
        raise InputError(f"--workers {workers}: need at least 1")
    input_dir, output_dir = os.fspath(input_dir), os.fspath(output_dir)
    model_dir = resolve_model_folder(model_dir)
    dataset_json = load_json(os.path.join(model_dir, "dataset.json"))
    class_names = read_class_labels(dataset_json, os.path.join(model_dir, "dataset.json")).class_names
    all_cases, problems = list_cases(input_dir, dataset_json["file_ending"], dataset_json["channel_names"])
    mine = set(part_of([c.name for c in all_cases] + list(problems), num_parts, part_id))
    cases = [c for c in all_cases if c.name in mine]
    report = PredictionReport(output_dir, failed={n: m for n, m in problems.items() if n in mine})
    if report.failed and not continue_on_error:
        raise InputError(report.failed[min(report.failed)])

    os.makedirs(output_dir, exist_ok=True)
    rows_on_disk = known_rows(output_dir)
    todo = cases if overwrite else [c for c in cases if not is_done(c, output_dir, rows_on_disk)]
    report.skipped = [c.name for c in cases if c not in todo]
    shard = f" (part {part_id} of {num_parts})" if num_parts > 1 else ""
    print(f"{len(cases)} case(s){shard}: {len(todo)} to predict, {len(report.skipped)} already done and skipped"
          + (" (--overwrite redoes them)" if report.skipped else ""))
    rows = ClassRows(output_dir, class_names, part_id if num_parts > 1 else None, [c.output_name for c in cases])
    if todo:
        _predict_cases(todo, output_dir, model_dir, rows, report, folds=folds, checkpoint=checkpoint,
                       device=device, tta=tta, mode=mode, max_whole_voxels=max_whole_voxels,
                       continue_on_error=continue_on_error, workers=workers, progress=progress)
    _merge(all_cases, output_dir, rows, report, num_parts)
    return report


def _merge(all_cases: List[Case], output_dir: str, rows: ClassRows, report: PredictionReport, num_parts: int):
    on_disk = known_rows(output_dir)
    missing = [c.name for c in all_cases if not is_done(c, output_dir, on_disk)]
    if num_parts == 1 or not missing:
        rows.write_merged()
    report.merged = not missing
    if num_parts > 1:
        print("every case of the input is done: wrote the merged CSVs" if not missing else
              f"{len(missing)} case(s) of the input not done yet: the merged CSVs are written by the run that "
              f"finishes the last of them")


def _predict_cases(todo: List[Case], output_dir: str, model_dir: str, rows: ClassRows, report: PredictionReport,
                   folds, checkpoint, device, tta, mode, max_whole_voxels, continue_on_error, workers, progress):
    # imported only now: torch and nnU-Net's predictor take seconds, which input errors should not wait for
    import torch
    from multitask_nnunet.inference.case_io import CaseIO
    from multitask_nnunet.inference.export import export_configuration, segmentation_in_input_geometry
    from multitask_nnunet.inference.predictor import MultitaskPredictor

    device = _device(device)
    options = {} if max_whole_voxels is None else {"max_whole_volume_voxels": max_whole_voxels}
    predictor = MultitaskPredictor(tile_step_size=0.5, use_mirroring=tta, device=device, mode=mode, **options)
    predictor.initialize_from_trained_model_folder(model_dir, resolve_folds(model_dir, folds, checkpoint),
                                                   checkpoint)
    export_cm = export_configuration(predictor.configuration_manager, device)
    io = CaseIO(predictor.plans_manager, predictor.configuration_manager, predictor.dataset_json)
    start = time.perf_counter()
    with ThreadPoolExecutor(workers, "read") as readers, ThreadPoolExecutor(1, "write") as writer:
        upcoming, reading, writing = iter(todo), deque(), deque()

        def read_ahead():  # keep every reader busy, and one case more
            while len(reading) <= workers and (case := next(upcoming, None)) is not None:
                reading.append((case, readers.submit(io.read_and_preprocess, case)))

        try:
            read_ahead()
            with tqdm(total=len(todo), desc="predict", unit="case", disable=not progress) as bar:
                while reading:
                    case, future = reading.popleft()
                    read_ahead()
                    t0 = time.perf_counter()
                    try:
                        data, properties = future.result()
                    except InputError as e:
                        if not continue_on_error:
                            raise
                        report.failed[case.name] = str(e)
                        tqdm.write(f"{case.name}: failed: {e}")
                        bar.update()
                        continue
                    t1 = time.perf_counter()
                    logits, probabilities = predictor.predict_preprocessed(torch.from_numpy(data))
                    t2 = time.perf_counter()
                    segmentation = segmentation_in_input_geometry(logits, properties, predictor.plans_manager,
                                                                  export_cm, predictor.label_manager)
                    t3 = time.perf_counter()
                    writing.append((case, probabilities, writer.submit(
                        io.write_mask, segmentation, properties, os.path.join(output_dir, case.output_name))))
                    _collect_writes(writing, rows, report, wait=False)
                    bar.update()
                    tqdm.write(f"{case.name}: {t3 - t0:.2f} s ({predictor.last_path}, class "
                               f"{int(probabilities.argmax())}; input wait {t1 - t0:.2f} s, network {t2 - t1:.2f} s, "
                               f"export {t3 - t2:.2f} s)")
        finally:
            for _, future in reading:
                future.cancel()
            _collect_writes(writing, rows, report, wait=True)
    report.seconds = time.perf_counter() - start
    if report.predicted:
        print(f"predicted {len(report.predicted)} case(s) in {report.seconds:.1f} s "
              f"({report.seconds / len(report.predicted):.2f} s per case) on {device}")


def _collect_writes(writing: Deque, rows: ClassRows, report: PredictionReport, wait: bool) -> None:
    """Record the cases whose mask is written, in order: the class row only goes in after the mask."""
    while writing and (wait or writing[0][2].done()):
        case, probabilities, future = writing.popleft()
        future.result()
        rows.add(case.output_name, probabilities)
        report.predicted.append(case.name)


def _device(device):
    import torch
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA device is available (use --device cpu)")
    return device


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "predict", help="segment and classify every case of a folder (masks + subtype_results.csv)",
        description="Predict every case of TEST_DIR (nnU-Net channel naming <case>_XXXX.nii.gz) into OUT_DIR: "
                    "<case>.nii.gz label maps in the input geometry, subtype_results.csv (Names,Subtype) and "
                    "class_probabilities.csv. Finished cases are skipped on a rerun (--overwrite redoes them); "
                    "with --num-parts each part keeps its rows in OUT_DIR/parts/part_I/ and the part that finds "
                    "every case done writes the merged CSVs (any later run into OUT_DIR merges too).")
    p.add_argument("-i", required=True, metavar="TEST_DIR", help="input images")
    p.add_argument("-o", required=True, metavar="OUT_DIR", help="output folder")
    p.add_argument("-m", metavar="MODEL_DIR", help="nnU-Net results folder Trainer__Plans__configuration")
    p.add_argument("-d", metavar="DATASET", help="instead of -m: dataset name or id, as for nnUNetv2_predict")
    p.add_argument("-c", metavar="CONFIGURATION", help="with -d: configuration, e.g. 3d_fullres")
    p.add_argument("-tr", default=DEFAULT_TRAINER, metavar="TRAINER", help=f"with -d (default {DEFAULT_TRAINER})")
    p.add_argument("-p", default=DEFAULT_PLANS, metavar="PLANS", help=f"with -d (default {DEFAULT_PLANS})")
    p.add_argument("-f", nargs="+", metavar="FOLD",
                   help="folds to ensemble (default: every fold_N with the checkpoint)")
    p.add_argument("-chk", default="checkpoint_final.pth", metavar="CHECKPOINT",
                   help="checkpoint file name (default checkpoint_final.pth)")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if available, else cpu")
    p.add_argument("--tta", action="store_true", help="mirroring test-time augmentation (off by default)")
    p.add_argument("--mode", choices=["auto", "whole", "sliding"], default="auto",
                   help="auto (default): whole volume in one pass when it has at most --max-whole-voxels "
                        "voxels after preprocessing, else (or when CUDA runs out of memory) sliding window")
    p.add_argument("--max-whole-voxels", type=int, metavar="N",
                   help="largest preprocessed volume (voxels) for a whole-volume pass in auto mode (default: twice "
                        "the patch's voxels)")
    p.add_argument("--overwrite", action="store_true", help="predict cases that are already done again")
    p.add_argument("--num-parts", type=int, default=1, metavar="N", help="split the cases into N parts ...")
    p.add_argument("--part-id", type=int, default=0, metavar="I", help="... and predict part I (0 <= I < N)")
    p.add_argument("--continue-on-error", action="store_true",
                   help="skip bad cases, report them all at the end and exit with status 1")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS, metavar="N",
                   help=f"background threads that read and preprocess cases (default {DEFAULT_WORKERS})")
    p.set_defaults(func=_run)


def _run(args) -> int:
    model_dir = resolve_model_folder(args.m, args.d, args.c, args.tr, args.p)
    report = predict_folder(args.i, args.o, model_dir, args.f, args.chk, args.device, args.tta, args.mode,
                            args.max_whole_voxels, args.overwrite, args.num_parts, args.part_id,
                            args.continue_on_error, args.workers)
    if report.failed:
        print(f"multitask-nnunet predict: {len(report.failed)} case(s) failed, {len(report.predicted)} predicted:",
              file=sys.stderr)
        for name in sorted(report.failed):
            message = report.failed[name]
            print(f"multitask-nnunet predict: error: {message}", file=sys.stderr)
        return 1
    return 0
