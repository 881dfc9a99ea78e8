"""Evaluation: whole runs from a config, scored and written to disk."""

from .bench import BenchConfig, clean_control, load_bench_config, read_results, run_bench
from .craft import CraftConfig, choose_targets, craft_poisons
from .report import score, write_report
from .run import RunConfig, build_model, execute_run, prepare_data, pretrain, run_training

__all__ = ["BenchConfig", "CraftConfig", "RunConfig", "build_model", "choose_targets",
           "clean_control",
           "craft_poisons", "execute_run", "load_bench_config", "prepare_data", "pretrain",
           "read_results", "run_bench", "run_training", "score", "write_report"]
