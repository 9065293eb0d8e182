"""The medical-dialogue data pipeline: load → clean → deduplicate → split → write (+ report).

Contract between the stages (and with training/evaluation):

* Loaders (`medtune.data.load`) return a `pyarrow.Table` of raw rows with string columns
  ``title, ask, answer, department, sub_department, system, history, source_file`` and int64
  ``source_line`` (1-based line in the source file where the row starts); ``history`` is a JSON list
  of earlier ``{"role", "content"}`` turns ("[]" when none), ``system`` the input's own system message
  ("" when none). Rows that cannot be parsed become rejects instead.
* A prepared directory (`medtune data prepare --output DIR`) holds ``train.parquet``,
  ``validation.parquet``, ``test.parquet`` with columns ``id, question, answer, department,
  sub_department, source_file, source_line, messages`` (``messages``: list of ``{role, content}``,
  system prompt first, built by `medtune.chat_format.build_messages`); ``rejects.jsonl`` (every dropped
  row with ``reason``); ``boilerplate.json``; ``manifest.json``; ``department_classifier.npz``.
  ``datasets.load_dataset("parquet", data_dir=DIR)`` loads the splits.
"""

SPLITS = ("train", "validation", "test")
TOP_DEPARTMENTS = {
    "Andriatria_男科": "男科",
    "IM_内科": "内科",
    "OAGD_妇产科": "妇产科",
    "Oncology_肿瘤科": "肿瘤科",
    "Pediatric_儿科": "儿科",
    "Surgical_外科": "外科",
}
# Published row counts of the full dataset, per folder (used by `medtune data download` to check).
PUBLISHED_ROWS = {
    "Andriatria_男科": 94_596,
    "IM_内科": 220_606,
    "OAGD_妇产科": 183_751,
    "Oncology_肿瘤科": 75_553,
    "Pediatric_儿科": 101_602,
    "Surgical_外科": 115_991,
}
