"""Training data: load rows, turn them into conversations, tokenize them with label masks, batch them.

The pipeline, one module per stage (each imports only from the stages before it; `batching` stands alone):

1. `loading`: `load_rows` reads a `.jsonl`/`.json`/`.csv`/`.parquet` file, a `datasets.save_to_disk` directory
   or a Hub id into a `datasets.Dataset` (problems name the file and line); `map_columns` renames a source's
   columns to the fields its format reads.
2. `formatting`: `format_row` turns an alpaca, chat (OpenAI `messages` or ShareGPT `conversations`) or completion
   row into a list of messages (or the plain text of a completion row); `resolve_template` picks the prompt
   template; `prompt_and_reference` splits a row for evaluation by generation.
3. `tokenizing`: `tokenize_dataset` renders each conversation into `(text, trainable)` segments; the joined text
   is tokenized once and a token is trained when it ends inside a trainable segment. Labels are -100 elsewhere.
   Examples are truncated to `max_seq_length`; those left with nothing to train on are dropped and counted in
   one warning. Each source of a config is kept in the tokenized-data cache (`token_cache`) unless
   `cache_tokenized` is false.
4. `splitting`: `split_train_val` holds out validation data without leaking copies; `build_datasets` runs
   steps 1-3 for a config: one `dataset_name`, or several `datasets:` sources (each with its own format, split,
   column mapping and mixing weight) mixed by weight.
5. `batching`: `epoch_batches` plans each epoch's micro-batches deterministically from the seed;
   `PaddedCollator` and `PackedCollator` (padding-free) turn a micro-batch into tensors.

The names below are those callers import from `app.sft.data`.
"""

from app.sft.data.batching import PackedCollator, PaddedCollator, epoch_batches
from app.sft.data.formatting import CHAT_ROLES, default_template, format_row, prompt_and_reference, resolve_template
from app.sft.data.loading import EVAL_SPLITS, load_rows, map_columns
from app.sft.data.splitting import build_datasets, split_train_val
from app.sft.data.tokenizing import END_OF_TURN_TOKENS, prepare_dataset, tokenize_dataset, tokenize_example
from app.sft.errors import ConfigError, DataError, DataWarning
from app.sft.loss import IGNORE_INDEX
from app.sft.tokenized import TokenizedDataset

__all__ = [
    "CHAT_ROLES",
    "END_OF_TURN_TOKENS",
    "EVAL_SPLITS",
    "IGNORE_INDEX",
    "ConfigError",
    "DataError",
    "DataWarning",
    "PackedCollator",
    "PaddedCollator",
    "TokenizedDataset",
    "build_datasets",
    "default_template",
    "epoch_batches",
    "format_row",
    "load_rows",
    "map_columns",
    "prepare_dataset",
    "prompt_and_reference",
    "resolve_template",
    "split_train_val",
    "tokenize_dataset",
    "tokenize_example",
]
