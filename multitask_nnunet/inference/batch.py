"""``multitask-nnunet predict``: segment and classify every case of a folder with one trained model.

Writes ``OUT_DIR/<case><ending>`` (label map in the input image's geometry, nnU-Net's export) and one row per
case in ``OUT_DIR/subtype_results.csv`` (``Names,Subtype``) and ``class_probabilities.csv`` (probabilities,
entropy, confidence; ``mutual_information`` with ``--mc-dropout``). ``--saliency`` adds
``<case>_saliency<ending>``, ``<case>_pooling<ending>`` (guided head), ``<case>_saliency.png`` and
``OUT_DIR/index.html``; ``--seg-uncertainty`` adds ``<case>_seg_uncertainty<ending>`` (cases.py names them).

Each case goes through the one-case predictor (case_predictor.py, loaded once); this module adds only what a
folder needs:

- pipeline threads: background threads read and preprocess the next cases (``CasePredictor.prepare``) and
  write finished masks while the main thread runs the network and the export (``CasePredictor.finish``); both
  queues are bounded (one case per reader more than the readers, ``MAX_PENDING_WRITES`` unwritten results);
- resumable: a case whose mask (and every extra output asked for) exists and whose row is in the CSVs is
  skipped unless ``--overwrite``. Masks, maps and CSVs are written atomically, the CSVs after every finished
  case and merged with the rows already on disk (class_rows.py), so a crash loses no finished case; the
  temporary files of a killed run are removed by the next (atomic.py);
- sharding: ``--num-parts N --part-id I`` predicts every N-th case of the sorted input, as nnU-Net does.
  Parts may share OUT_DIR: each keeps its rows in ``OUT_DIR/parts/part_I/``; the part that finds every case
  of the input done writes the merged CSVs. Any later run into OUT_DIR (e.g. without ``--num-parts``; it
  skips the finished cases) merges as well;
- bad input raises ``InputError`` naming the file; with ``--continue-on-error`` the other cases are still
  predicted, every failure is reported at the end, one line each, and the exit status is 1;
- an output that cannot be written (a full, over-quota, read-only or not writable OUT_DIR) stops the run, with
  ``--continue-on-error`` too (every later case would fail alike): a ``WriteError`` naming the file and saying
  how many cases are done, one line. Every file under its final name is complete (atomic.py checks NIfTI files
  before the rename: SimpleITK's writer does not report a full disk), so a rerun resumes with the rest;
- every run ends with the time breakdown (start-up, model load, read, preprocess, network, export, write;
  timing.py explains what adds up to the wall time); ``--profile FILE`` writes it per case as JSON.

Python API: ``predict_folder(input_dir, output_dir, model_dir, BatchOptions(...)) -> PredictionReport``; for one
case at a time, ``CasePredictor`` (case_predictor.py).
"""
import argparse
import gc
import glob
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Deque, Dict, List, Optional

from tqdm import tqdm

from multitask_nnunet.io.atomic import remove_leftover_temporaries
from multitask_nnunet.io.class_csv import PROBABILITIES_CSV
from multitask_nnunet.errors import InputError, WriteError, write_failure
from multitask_nnunet.inference.cases import InputCase, is_done, list_cases, part_of
from multitask_nnunet.inference.class_rows import PARTS_FOLDER, ClassRows, known_extra_columns, known_rows
from multitask_nnunet.inference.model_folder import DEFAULT_PLANS, DEFAULT_TRAINER, ModelFolder
from multitask_nnunet.inference.options import (DEFAULT_CHECKPOINT, DEFAULT_SALIENCY_METHOD, DEFAULT_SALIENCY_STAGE,
                                                DEFAULT_WORKERS, SALIENCY_METHODS,
                                                BatchOptions, PredictorOptions)
from multitask_nnunet.inference.timing import (EXPORT, MODEL_LOAD, NETWORK, PREPROCESS, READ, STARTUP, WRITE,
                                               Breakdown, overlap, process_start)

#: finished cases that may wait for the writer thread; the main thread waits for the oldest beyond this
MAX_PENDING_WRITES = 2

__all__ = ["predict_folder", "PredictionReport", "BatchOptions", "PredictorOptions", "add_parser"]


@dataclass
class PredictionReport:
    output_folder: str
    predicted: List[str] = field(default_factory=list)       # cases predicted by this run
    skipped: List[str] = field(default_factory=list)         # cases already done before this run
    failed: Dict[str, str] = field(default_factory=dict)     # case (or file) name -> message
    merged: bool = False                                     # merged CSVs hold every case of the input
    seconds: float = 0.0                                     # wall time (since the breakdown's start)
    timing: dict = field(default_factory=dict)               # the time breakdown (timing.Breakdown.summary)


def predict_folder(input_dir, output_dir, model_dir, options: BatchOptions = BatchOptions(),
                   breakdown: Optional[Breakdown] = None) -> PredictionReport:
    """Predict every case of ``input_dir`` (nnU-Net channel naming) into ``output_dir``; see the module
    docstring and ``BatchOptions``. ``breakdown``: where the times go; the CLI's starts at the process start,
    the default at this call. Raises ``InputError`` on the first bad case unless ``options.continue_on_error``,
    in which case failures are in the report; ``WriteError`` (always) on the first output that cannot be
    written, its message saying how many cases are done."""
    breakdown = breakdown or Breakdown()
    if options.workers < 1:
        raise InputError(f"--workers {options.workers}: need at least 1")
    input_dir, output_dir = os.fspath(input_dir), os.fspath(output_dir)
    model = ModelFolder.open(model_dir, options.predictor.folds, options.predictor.checkpoint)
    dataset_json = model.dataset_json
    all_cases, problems = list_cases(input_dir, dataset_json["file_ending"], dataset_json["channel_names"])
    mine = set(part_of([c.name for c in all_cases] + list(problems), options.num_parts, options.part_id))
    cases = [c for c in all_cases if c.name in mine]
    report = PredictionReport(output_dir, failed={n: m for n, m in problems.items() if n in mine})
    if report.failed and not options.continue_on_error:
        raise InputError(report.failed[min(report.failed)])

    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:
        failure = write_failure(e, output_dir)
        if failure is None:
            raise
        raise failure.with_note(_progress_note(report, len(cases), failure)) from None
    _remove_leftovers(output_dir)
    done = _done_check(output_dir, options)
    todo = cases if options.overwrite else [c for c in cases if not done(c)]
    report.skipped = [c.name for c in cases if c not in todo]
    shard = f" (part {options.part_id} of {options.num_parts})" if options.num_parts > 1 else ""
    print(f"{len(cases)} case(s){shard}: {len(todo)} to predict, {len(report.skipped)} already done and skipped"
          + (" (--overwrite redoes them)" if report.skipped else ""))
    loaded = []  # the CasePredictor, once loaded: the class names come from its checkpoint

    def class_names() -> List[str]:
        return loaded[0].class_names if loaded else model.class_names

    sharded = options.num_parts > 1
    rows = ClassRows(output_dir, class_names, options.part_id if sharded else None, [c.output_name for c in cases])
    try:
        if todo:
            _predict_cases(todo, output_dir, model, rows, report, options, breakdown, loaded)
        else:
            breakdown.mark(STARTUP, breakdown.start)
        with breakdown.stage(WRITE):
            _merge(all_cases, output_dir, rows, report, options)
    except WriteError as e:
        raise e.with_note(_progress_note(report, len(cases), e)) from None
    report.seconds = breakdown.finish()
    report.timing = breakdown.summary()
    if report.predicted:
        device = loaded[0].device if loaded else "?"
        print(f"predicted {len(report.predicted)} case(s) in {report.seconds:.1f} s "
              f"({report.seconds / len(report.predicted):.2f} s per case) on {device}")
    print("\n".join(breakdown.lines()))
    if options.profile:
        breakdown.write_profile(options.profile, {"model": model.path, "input": input_dir, "output": output_dir,
                                                  "device": str(loaded[0].device) if loaded else None,
                                                  "options": asdict(options)})
    return report


def _progress_note(report: PredictionReport, total: int, error: WriteError) -> str:
    """What a write failure adds to its line: how many cases are done (mask, extra outputs and CSV rows on disk),
    and that a rerun resumes."""
    done = len(report.skipped) + len(report.predicted)
    failed = f", {len(report.failed)} failed" if report.failed else ""
    when = " once there is room" if error.no_room else ""
    rest = f"resume with the other {total - done}" if done < total else "finish"
    return f"{done} of {total} case(s) done{failed}; rerun the same command{when} to {rest}"


def _remove_leftovers(output_dir: str) -> None:
    """The temporary files of masks and CSVs that a killed run (of any part) was writing."""
    folders = [output_dir] + sorted(glob.glob(os.path.join(output_dir, PARTS_FOLDER, "part_*")))
    removed = [os.path.join(os.path.relpath(f, output_dir), name) if f != output_dir else name
               for f in folders for name in remove_leftover_temporaries(f)]
    if removed:
        print(f"removed {len(removed)} temporary file(s) that an interrupted run left in {output_dir}: "
              f"{', '.join(removed)}")


def _done_check(output_dir: str, options: BatchOptions):
    """``done(case)``: every output this run asks for exists (cases.is_done), from what is on disk now."""
    rows_on_disk, columns_on_disk = known_rows(output_dir), known_extra_columns(output_dir)
    p = options.predictor
    required = ["mutual_information"] if p.mc_dropout > 0 else []
    return lambda case: is_done(case, output_dir, rows_on_disk, case.extra_output_names(p.saliency, p.seg_uncertainty),
                                columns_on_disk, required)


def _merge(all_cases: List[InputCase], output_dir: str, rows: ClassRows, report: PredictionReport, options: BatchOptions):
    num_parts = options.num_parts
    done = _done_check(output_dir, options)
    missing = [c.name for c in all_cases if not done(c)]
    if num_parts == 1 or not missing:
        rows.write_merged()
    if options.predictor.saliency:
        from multitask_nnunet.inference.figures import write_index
        write_index(output_dir)
    report.merged = not missing
    if num_parts > 1:
        print("every case of the input is done: wrote the merged CSVs" if not missing else
              f"{len(missing)} case(s) of the input not done yet: the merged CSVs are written by the run that "
              f"finishes the last of them")


def _predict_cases(todo: List[InputCase], output_dir: str, model: ModelFolder, rows: ClassRows, report: PredictionReport,
                   options: BatchOptions, breakdown: Breakdown, loaded: list):
    # imported only now: torch and nnU-Net's predictor take seconds, which input errors should not wait for
    from multitask_nnunet.inference.case_predictor import MC_DROPOUT, SALIENCY, CasePredictor

    breakdown.mark(STARTUP, breakdown.start)
    with breakdown.stage(MODEL_LOAD):
        predictor = CasePredictor(model, options.predictor, load_network=False)
    workers = options.workers
    with ThreadPoolExecutor(workers, "read") as readers, ThreadPoolExecutor(1, "write") as writer:
        upcoming, reading, writing = iter(todo), deque(), deque()

        def read_ahead():  # keep every reader busy, and one case more
            while len(reading) <= workers and (case := next(upcoming, None)) is not None:
                reading.append((case, readers.submit(predictor.prepare, case.files, None, case.name)))

        def write(case: InputCase, result) -> float:
            """The case's extra outputs first, the mask last (a rerun checks them all, cases.is_done)."""
            t0 = time.perf_counter()
            path = lambda name: os.path.join(output_dir, name)  # noqa: E731
            extra = case.extra_output_names(options.predictor.saliency, options.predictor.seg_uncertainty)
            if options.predictor.saliency:
                if result.pooling_weights is not None:
                    predictor.write_pooling_weights(result, path(case.pooling_name))
                predictor.write_saliency(result, path(extra[0]))
                predictor.write_figure(result, case.files, path(extra[1]))
            if options.predictor.seg_uncertainty:
                predictor.write_seg_uncertainty(result, path(extra[-1]))
            predictor.write_mask(result, path(case.output_name))
            return time.perf_counter() - t0

        def failed(case: InputCase, error: InputError) -> None:
            if not options.continue_on_error:
                raise error
            report.failed[case.name] = str(error)
            tqdm.write(f"{case.name}: failed: {error}")

        try:
            read_ahead()  # the readers start on the first cases while the network is built
            with breakdown.stage(MODEL_LOAD):
                predictor.load_network()
            loaded.append(predictor)
            with tqdm(total=len(todo), desc="predict", unit="case", disable=not options.progress) as bar:
                while reading:
                    case, future = reading.popleft()
                    read_ahead()
                    t0 = time.perf_counter()
                    try:
                        prepared = future.result()
                    except InputError as e:
                        breakdown.waited(READ, time.perf_counter() - t0)
                        failed(case, e)
                        bar.update()
                        continue
                    _record_input_wait(breakdown, t0, time.perf_counter(), prepared)
                    try:
                        result = predictor.finish(prepared)
                    except InputError as e:
                        failed(case, e)
                        bar.update()
                        continue
                    finally:
                        del prepared  # the preprocessed volume: free it before the next case
                    # saliency's and MC dropout's passes count as network time (timings per case: --profile)
                    breakdown.ran(NETWORK, sum(result.timings.get(s, 0.0) for s in (NETWORK, SALIENCY, MC_DROPOUT)))
                    breakdown.ran(EXPORT, result.timings[EXPORT])
                    writing.append((case, result, writer.submit(write, case, result)))
                    with breakdown.stage(WRITE):  # waits only when MAX_PENDING_WRITES cases are still unwritten
                        _collect_writes(writing, rows, report, breakdown, keep=MAX_PENDING_WRITES)
                    bar.update()
                    if options.progress:
                        tqdm.write(_case_line(result))
        finally:
            for _, future in reading:
                future.cancel()
            with breakdown.stage(WRITE):
                _collect_writes(writing, rows, report, breakdown, keep=0)


def _record_input_wait(breakdown: Breakdown, t0: float, t1: float, prepared) -> None:
    """The main thread waited t0..t1 for a case: the part overlapping its preprocessing is preprocess, the rest
    (its reading, or queueing behind other cases) read. The readers' busy time is counted as well."""
    preprocess = overlap(t0, t1, *prepared.intervals[PREPROCESS])
    breakdown.waited(PREPROCESS, preprocess)
    breakdown.waited(READ, (t1 - t0) - preprocess)
    for stage in (READ, PREPROCESS):
        breakdown.worked(stage, prepared.timings[stage])


def _case_line(result) -> str:
    t = result.timings
    fallback = f": {result.fallback}" if result.fallback else ""
    return (f"{result.name}: {result.path}{fallback}, class {result.class_index} ({result.class_name}); "
            f"read {t['read']:.2f} s, preprocess {t['preprocess']:.2f} s, network {t['network']:.2f} s, "
            f"export {t['export']:.2f} s" + _guide_text(result))


def _guide_text(result) -> str:
    if not result.guide:
        return ""
    if result.guide["no_guide"]:
        return "; no guide structure predicted: the class rests on the organ alone"
    return f"; guide {result.guide['guide_ml']:.2f} mL"


def _collect_writes(writing: Deque, rows: ClassRows, report: PredictionReport, breakdown: Breakdown,
                    keep: int) -> None:
    """Record the cases whose mask is written, in order: the class row only goes in after the mask. Waits for
    the oldest writes until at most ``keep`` are pending, so finished results (full-size masks, maps) cannot
    pile up in memory when writing is slower than the network. A write that fails (``WriteError``: the mask or
    the CSVs) drops the cases still pending, unrecorded (a rerun predicts them), and is raised."""
    while writing and (len(writing) > keep or writing[0][2].done()):
        case, result, future = writing.popleft()
        try:
            write_seconds = future.result()
            extra = {**{k: v for k, v in result.uncertainty.items() if k == "mutual_information"}, **result.guide}
            rows.add(case.output_name, result.probabilities, extra)
        except WriteError:
            _drop_writes(writing)
            raise
        breakdown.worked(WRITE, write_seconds)
        report.predicted.append(case.name)
        if result.guide.get("no_guide"):
            tqdm.write(f"{case.name}: no guide structure predicted: its class rests on the organ alone "
                       f"(no_guide = 1 in {PROBABILITIES_CSV})")
        breakdown.add_case({"name": case.name, "path": result.path, "fallback": result.fallback,
                            "class_index": result.class_index, "class_name": result.class_name,
                            "shape": list(result.shape), "preprocessed_shape": list(result.preprocessed_shape),
                            **{f"{stage}_s": round(seconds, 4) for stage, seconds in result.timings.items()},
                            "uncertainty": {k: round(v, 6) for k, v in result.uncertainty.items()},
                            **result.guide, "write_s": round(write_seconds, 4)})


def _drop_writes(writing: Deque) -> None:
    """Cancel the writes not yet started and wait for the one running (its own failure, most likely the same,
    is not reported again)."""
    for _, _, future in writing:
        future.cancel()
    for _, _, future in writing:
        if not future.cancelled():
            future.exception()
    writing.clear()


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "predict", help="segment and classify every case of a folder (masks + subtype_results.csv)",
        description="Predict every case of TEST_DIR (nnU-Net channel naming <case>_XXXX.nii.gz) into OUT_DIR: "
                    "<case>.nii.gz label maps in the input geometry, subtype_results.csv (Names,Subtype) and "
                    "class_probabilities.csv (+ saliency maps, PNGs and index.html with --saliency). Finished cases "
                    "are skipped on a rerun (--overwrite redoes them); "
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
    p.add_argument("-chk", default=DEFAULT_CHECKPOINT, metavar="CHECKPOINT",
                   help=f"checkpoint file name (default {DEFAULT_CHECKPOINT})")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if available, else cpu")
    p.add_argument("--tta", action="store_true", help="mirroring test-time augmentation (off by default)")
    p.add_argument("--mode", choices=["auto", "whole", "sliding"], default="auto",
                   help="auto (default): whole volume in one pass when it fits in the patch after preprocessing "
                        "(or has at most --max-whole-voxels voxels), else (or when CUDA runs out of memory) "
                        "sliding window")
    p.add_argument("--max-whole-voxels", type=int, metavar="N",
                   help="auto mode: run volumes of up to N preprocessed voxels in one pass, whatever their shape "
                        "(default: only volumes that fit in the patch on every axis; larger passes drift from "
                        "the sliding window's result)")
    p.add_argument("--device-preprocessing", action=argparse.BooleanOptionalAction, default=None,
                   help="normalise and resample each case on the prediction device with torch, matching nnU-Net's "
                        "CPU preprocessing to float32 rounding (default: on with CUDA, off on CPU)")
    p.add_argument("--saliency", action="store_true",
                   help="per case: <case>_saliency.nii.gz (class activation map of the predicted class, input "
                        "geometry), "
                        "<case>_pooling.nii.gz (the guided head's pooling weights) and <case>_saliency.png; "
                        "OUT_DIR/index.html shows all PNGs. Costs a forward and backward pass per fold and case")
    p.add_argument("--saliency-stage", type=int, default=DEFAULT_SALIENCY_STAGE, metavar="S",
                   help=f"encoder stage of the saliency map (0 = highest resolution, negative from the end; default "
                        f"{DEFAULT_SALIENCY_STAGE})")
    p.add_argument("--saliency-method", default=DEFAULT_SALIENCY_METHOD, choices=SALIENCY_METHODS,
                   help=f"decision: where the guided head pooled (the lesion, the organ), each branch weighted by "
                        f"its part in the predicted class (a head without a guide: hirescam); hirescam: the "
                        f"gradient times the activation, per voxel; gradcam: Grad-CAM, whose channel weights are the "
                        f"gradient's mean over the volume (default {DEFAULT_SALIENCY_METHOD})")
    p.add_argument("--no-calibration", action="store_true",
                   help="do not apply the folds' temperature scaling (fold_X/calibration.json, fitted in final "
                        "validation; models without it are never calibrated)")
    p.add_argument("--mc-dropout", type=int, default=0, metavar="N",
                   help="N extra passes with the classification head's dropout on: adds mutual_information to "
                        "class_probabilities.csv (default 0: off)")
    p.add_argument("--seg-uncertainty", action="store_true",
                   help="per case: <case>_seg_uncertainty.nii.gz, the per-voxel segmentation entropy in [0, 1]")
    p.add_argument("--overwrite", action="store_true", help="predict cases that are already done again")
    p.add_argument("--num-parts", type=int, default=1, metavar="N", help="split the cases into N parts ...")
    p.add_argument("--part-id", type=int, default=0, metavar="I", help="... and predict part I (0 <= I < N)")
    p.add_argument("--continue-on-error", action="store_true",
                   help="skip bad cases, report them all at the end and exit with status 1")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS, metavar="N",
                   help=f"background threads that read and preprocess cases (default {DEFAULT_WORKERS})")
    p.add_argument("--profile", metavar="FILE",
                   help="write the time breakdown per case as JSON (the totals are printed at the end of every run)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    breakdown = Breakdown(process_start())  # start-up counts from the process start: interpreter and imports
    model = ModelFolder.open(args.m, args.f, args.chk, dataset=args.d, configuration=args.c, trainer=args.tr,
                             plans=args.p)
    options = BatchOptions(PredictorOptions(args.f, args.chk, args.device, args.tta, args.mode, args.max_whole_voxels,
                                            args.device_preprocessing, saliency=args.saliency,
                                            saliency_stage=args.saliency_stage,
                                            saliency_method=args.saliency_method, calibration=not args.no_calibration,
                                            mc_dropout=args.mc_dropout, seg_uncertainty=args.seg_uncertainty),
                           args.overwrite, args.num_parts, args.part_id, args.continue_on_error, args.workers,
                           profile=args.profile)
    report = predict_folder(args.i, args.o, model, options, breakdown)
    # the command ends here: without this, the interpreter's exit scans every object that torch and nnU-Net
    # created (measured 1.3-1.6 s on the loaded 2-core CPU, 0.2 s with it), after the breakdown was printed
    gc.freeze()
    if report.failed:
        print(f"multitask-nnunet predict: {len(report.failed)} case(s) failed, {len(report.predicted)} predicted:",
              file=sys.stderr)
        for name in sorted(report.failed):
            message = report.failed[name]
            print(f"multitask-nnunet predict: error: {message}", file=sys.stderr)
        return 1
    return 0
