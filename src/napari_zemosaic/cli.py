"""``zemosaic`` command line: run, demo, plan, info.

Exit codes: 0 ok, 1 internal error, 2 user error (bad arguments, nothing usable), 130 cancelled.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from .config import OPTIONS, ConfigError, apply_overrides, gpu_mode_overrides, load_config, parse_set_option
from .events import Event, LogEvent, ProgressEvent
from .i18n import set_language, tr

EXIT_OK, EXIT_INTERNAL, EXIT_USER, EXIT_CANCELLED = 0, 1, 2, 130


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's default exit code is 2 already; keep the text short
        self.print_usage(sys.stderr)
        print(tr("cli_error_arguments", detail=message), file=sys.stderr)
        raise SystemExit(EXIT_USER)


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help=tr("cli_help_config"))
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], help=tr("cli_help_set"))
    parser.add_argument("--lang", choices=("en", "fr"), help=tr("cli_help_lang"))


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="zemosaic", description=tr("cli_description"))
    parser.add_argument("--version", action="version", version=f"napari-zemosaic {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help=tr("cli_help_verbose"))
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)

    run = commands.add_parser("run", help=tr("cli_help_run"))
    run.add_argument("input", help=tr("cli_help_input"))
    run.add_argument("output", help=tr("cli_help_output"))
    _add_config_options(run)
    run.add_argument("--workflow", choices=("auto", "classic", "mosaic-first", "sds"), help=tr("cli_help_workflow"))
    run.add_argument("--gpu", choices=("auto", "on", "off"), default=None, help=tr("cli_help_gpu"))
    run.add_argument("--scheduler", metavar="local|ADDRESS", default=None, help=tr("cli_help_scheduler"))

    demo = commands.add_parser("demo", help=tr("cli_help_demo"))
    demo.add_argument("output", help=tr("cli_help_demo_output"))
    demo.add_argument("--panels", default="2x2", help=tr("cli_help_panels"))
    demo.add_argument("--frames-per-panel", type=int, default=8, help=tr("cli_help_frames_per_panel"))
    demo.add_argument("--scale", type=float, default=0.5, help=tr("cli_help_scale"))
    demo.add_argument("--seed", type=int, default=0, help=tr("cli_help_seed"))
    demo.add_argument("--no-run", action="store_true", help=tr("cli_help_no_run"))
    _add_config_options(demo)
    demo.add_argument("--gpu", choices=("auto", "on", "off"), default=None, help=tr("cli_help_gpu"))
    demo.add_argument("--scheduler", metavar="local|ADDRESS", default=None, help=tr("cli_help_scheduler"))

    plan = commands.add_parser("plan", help=tr("cli_help_plan"))
    plan.add_argument("input", help=tr("cli_help_input"))
    _add_config_options(plan)
    plan.add_argument("--json", action="store_true", help=tr("cli_help_json"))

    _add_solve_parser(commands)

    info = commands.add_parser("info", help=tr("cli_help_info"))
    info.add_argument("--json", action="store_true", help=tr("cli_help_json"))
    info.add_argument("--lang", choices=("en", "fr"), help=tr("cli_help_lang"))
    return parser


def _add_solve_parser(commands: Any) -> argparse.ArgumentParser:
    """``zemosaic solve INPUT [--index-dir DIR] [--solver ...] [--json]`` (plus --config/--set/--lang).
    Built without importing the engine: a run's worker server starts before NumPy loads."""
    parser = commands.add_parser("solve", help=tr("cli_help_solve"))
    parser.add_argument("input", help=tr("cli_help_solve_input"))
    parser.add_argument("--index-dir", metavar="DIR", help=tr("cli_help_index_dir"))
    parser.add_argument("--solver", choices=OPTIONS["solver"].choices, help=tr("cli_help_solver"))
    parser.add_argument("--cache-dir", metavar="DIR", help=tr("cli_help_solve_cache_dir"))
    parser.add_argument("--timeout", type=float, metavar="S", help=tr("cli_help_solve_timeout"))
    parser.add_argument("--json", action="store_true", help=tr("cli_help_json"))
    _add_config_options(parser)
    parser.set_defaults(handler=_cmd_solve)
    return parser


def _cmd_solve(args: argparse.Namespace) -> int:
    from .engine.astrometry import cli_solve

    return cli_solve(args)


def resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    """Config file (or the user's), then ``--set``, ``--workflow``, ``--gpu``, ``--scheduler``, ``--lang``."""
    config = load_config(getattr(args, "config", None))
    overrides: dict[str, Any] = dict(parse_set_option(text) for text in getattr(args, "set", []) or [])
    if getattr(args, "workflow", None):
        overrides["workflow"] = args.workflow.replace("-", "_")
    if getattr(args, "gpu", None):
        overrides.update(gpu_mode_overrides(args.gpu))
    if getattr(args, "scheduler", None):
        overrides["scheduler"] = args.scheduler
    if getattr(args, "lang", None):
        overrides["language"] = args.lang
    return apply_overrides(config, overrides)


class ConsoleProgress:
    """One tqdm bar per phase; log lines printed above the bars."""

    def __init__(self, verbose: bool = False) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self.verbose = verbose
        self.bar: Any = None
        self.phase: str | None = None

    def __call__(self, event: Event) -> None:
        if isinstance(event, LogEvent):
            if event.level == "debug" and not self.verbose:
                return
            if self.bar is not None and self.bar.total and self.bar.n >= self.bar.total:
                self.close()  # the phase is done: its bar should not be redrawn under later lines
            prefix = {"warning": "! ", "error": "x "}.get(event.level, "  ")
            self._tqdm.write(prefix + event.text(), file=sys.stderr)
        elif isinstance(event, ProgressEvent):
            if event.phase != self.phase or self.bar is None:
                self.close()
                self.phase = event.phase
                self.bar = self._tqdm(
                    total=event.total, desc=tr(f"phase_{event.phase}"), unit=tr(event.key or "progress_items"),
                    file=sys.stderr, leave=False, dynamic_ncols=True,
                )
            if self.bar.total != event.total:
                self.bar.total = event.total
            self.bar.n = event.done
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _print_error(key: str, params: dict[str, Any]) -> None:
    print(tr(key, **params), file=sys.stderr)


def _run_pipeline(input_dir: str, output_dir: str, config: dict[str, Any], verbose: bool) -> int:
    from .engine.worker_env import start_process_server, wants_device

    # The worker processes' server imports the engine while this process does (about 1 s each),
    # instead of once the run has started.
    start_process_server(wants_device(config))
    from .engine.context import UserError
    from .engine.pipeline import iter_run

    progress = ConsoleProgress(verbose)
    generator = iter_run(input_dir, output_dir, config)
    try:
        while True:
            try:
                event = next(generator)
            except StopIteration as stop:
                result = stop.value
                break
            progress(event)
    except KeyboardInterrupt:
        progress.close()
        generator.close()
        print(tr("run_warn_cancelled"), file=sys.stderr)
        return EXIT_CANCELLED
    except UserError as exc:
        progress.close()
        _print_error(exc.key, exc.params)
        return EXIT_USER
    except Exception as exc:  # an engine bug: say so plainly, keep the traceback in the log
        progress.close()
        _print_error("run_error_internal", {"error": f"{type(exc).__name__}: {exc}"})
        return EXIT_INTERNAL
    progress.close()
    print(tr("cli_info_outputs", science=result.science_path, preview=result.preview_path, report=result.report_path))
    return EXIT_OK


def cmd_run(args: argparse.Namespace, config: dict[str, Any]) -> int:
    return _run_pipeline(args.input, args.output, config, args.verbose)


def _parse_panels(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
        if rows < 1 or cols < 1:
            raise ValueError
    except ValueError:
        raise ConfigError("cli_error_panels", text=text) from None
    return rows, cols


def cmd_demo(args: argparse.Namespace, config: dict[str, Any]) -> int:
    from .engine.demo import DemoSpec, generate_demo

    if args.frames_per_panel < 1 or not (0.05 <= args.scale <= 1.0):
        raise ConfigError("cli_error_demo_values", frames=args.frames_per_panel, scale=args.scale)
    spec = DemoSpec(
        panels=_parse_panels(args.panels), frames_per_panel=args.frames_per_panel, scale=args.scale, seed=args.seed
    )
    out = Path(args.output)
    total = spec.panels[0] * spec.panels[1] * spec.frames_per_panel
    print(tr("demo_info_generating", frames=total, path=str(out / "frames")), file=sys.stderr)
    from tqdm import tqdm

    with tqdm(total=total, desc=tr("demo_progress"), file=sys.stderr, leave=False) as bar:
        generate_demo(out, spec, progress=lambda done, _total: bar.update(done - bar.n))
    print(tr("demo_info_written", frames=total, path=str(out / "frames")), file=sys.stderr)
    if args.no_run:
        return EXIT_OK
    return _run_pipeline(str(out / "frames"), str(out), config, args.verbose)


def cmd_plan(args: argparse.Namespace, config: dict[str, Any]) -> int:
    from .engine.plan import make_plan

    plan = make_plan(args.input, config)
    if args.json:
        print(json.dumps(plan, indent=2, default=str))
        return EXIT_OK if plan["frames"]["used"] else EXIT_USER
    print(tr("plan_header", found=plan["frames"]["found"], used=plan["frames"]["used"], workflow=plan["workflow"]))
    for row in plan["frame_table"]:
        print(
            f"  {Path(row['path']).name:48s} {row['instrument'] or '-':14s} "
            f"{row['wcs_status']:8s} {'seestar' if row['is_seestar'] else '':7s} {row['shape'][1]}x{row['shape'][0]}"
        )
    for excluded in plan["frames"]["excluded"]:
        params = {"path": excluded["path"], "detail": excluded["detail"], **excluded.get("params", {})}
        print("  x " + tr(excluded["reason_key"], **params))
    if plan["canvas"]:
        print(tr("canvas_info_built", width=plan["canvas"]["shape"][1], height=plan["canvas"]["shape"][0]))
    return EXIT_OK if plan["frames"]["used"] else EXIT_USER


def cmd_info(args: argparse.Namespace) -> int:
    from .engine.plan import system_info

    info = system_info()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return EXIT_OK
    print(tr("info_versions", version=info["version"], python=info["python"]))
    for name, version in info["packages"].items():
        print(f"  {name:12s} {version}")
    print(tr("info_gpu", summary=info["gpu"]["summary"]))
    if not info["solvers"]:
        print(tr("info_no_solver"))
    for solver in info["solvers"]:
        key = "info_solver" if solver["usable"] else "info_solver_unusable"
        print(tr(key, **solver))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if getattr(args, "lang", None):
        set_language(args.lang)
    try:
        if args.command == "info":
            return cmd_info(args)
        if args.command == "solve":
            return args.handler(args)
        config = resolve_config(args)
        set_language(config["language"])
        if args.command == "run":
            return cmd_run(args, config)
        if args.command == "demo":
            return cmd_demo(args, config)
        if args.command == "plan":
            return cmd_plan(args, config)
    except ConfigError as exc:
        _print_error(exc.key, exc.params)
        return EXIT_USER
    except KeyboardInterrupt:
        print(tr("run_warn_cancelled"), file=sys.stderr)
        return EXIT_CANCELLED
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        from .engine.context import UserError

        if isinstance(exc, UserError):
            _print_error(exc.key, exc.params)
            return EXIT_USER
        _print_error("run_error_internal", {"error": f"{type(exc).__name__}: {exc}"})
        return EXIT_INTERNAL
    parser.print_usage(sys.stderr)
    return EXIT_USER


def _nothing_left_running() -> bool:
    """No thread of the engine's (nor any that Python would wait for) and no child process left:
    what the program wrote is written."""
    import multiprocessing
    import threading

    others = [t for t in threading.enumerate() if t is not threading.current_thread()
              and t.is_alive() and (not t.daemon or t.name.startswith("zemosaic-"))]
    return not others and not multiprocessing.active_children()


def console_main() -> None:
    """The ``zemosaic`` program: :func:`main`, then the end of the process. Once the run has
    closed its files, pools and processes, the interpreter's teardown (every module's
    finalisation, CuPy's memory pools and CUDA context freed block by block) only delays the
    shell's prompt, so it is skipped then (``os._exit`` after the streams and logs are flushed)."""
    code = main()
    if _nothing_left_running():
        import logging
        import os

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    console_main()
