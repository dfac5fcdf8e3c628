"""Bad input gives one ValueError naming the argument, config field, file or line, not a
traceback from deep inside or a silently wrong result: token ids outside the vocabulary (JAX's
gather clamps them), CoCa's decoding ids and length penalty, optimizer fields that would turn
or stall the step, config.evals names with surrounding whitespace, and a class-names file whose
blank line would shift every later class's label."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.data import wds_pipeline
from mmjax.models import coca, factory
from mmjax.train import config as config_lib
from tests.configs import tiny_config
from tests.test_coca import EOS, LEN, VOCAB, params_of, tiny

TEXT_VOCAB = 100


@pytest.fixture(scope="module")
def two_tower():
  """A tiny SigLIP two-tower model (text vocabulary TEXT_VOCAB), its variables and an image."""
  model = factory.two_tower_model(tiny_config("/unused"), TEXT_VOCAB, loss="siglip")
  image = jnp.zeros((2, 32, 32, 3))
  return model, model.init(jax.random.PRNGKey(0), image, jnp.ones((2, 16), jnp.int32)), image


@pytest.mark.parametrize("bad", [TEXT_VOCAB, -1])
def test_text_tower_refuses_token_ids_outside_its_vocabulary(two_tower, bad):
  model, variables, image = two_tower
  tokens = np.ones((2, 16), np.int32)
  tokens[1, 3] = bad
  with pytest.raises(ValueError, match=rf"tokens: .*{bad}.*\[0, {TEXT_VOCAB}\).*row 1"):
    model.apply(variables, image, jnp.asarray(tokens))


def test_text_tower_under_jit_still_runs(two_tower):
  """Traced tokens cannot be checked: jit compiles as before (the data pipeline's ids come
  from the tokenizer the vocabulary was sized by)."""
  model, variables, image = two_tower
  out = jax.jit(model.apply)(variables, image, jnp.ones((2, 16), jnp.int32))
  assert np.isfinite(np.asarray(out[0])).all()


def test_coca_text_tower_refuses_token_ids_outside_its_vocabulary(rng):
  model = tiny()
  params, image = params_of(model, rng)
  tokens = np.full((3, LEN), 5, np.int32)
  tokens[2, 0] = VOCAB
  with pytest.raises(ValueError, match=rf"tokens: .*{VOCAB}.*\[0, {VOCAB}\).*row 2"):
    model.apply({"params": params}, image, jnp.asarray(tokens))


@pytest.mark.parametrize("kwargs, field", [
    (dict(eos_id=VOCAB), "eos_id"),          # never emitted: every caption runs to max_len
    (dict(eos_id=0), "eos_id"),              # the pad id: a live beam never emits it
    (dict(eos_id=-1), "eos_id"),
    (dict(eos_id=EOS, first=VOCAB + 5), "first"),   # the embedding gather would clamp it
    (dict(eos_id=EOS, length_penalty=math.nan), "length_penalty"),
    (dict(eos_id=EOS, beams=2.5), "beams"),
])
def test_make_generate_refuses_bad_decoding_arguments(kwargs, field):
  with pytest.raises(ValueError, match=rf"^{field}="):
    coca.make_generate(tiny(), max_len=LEN + 1, **kwargs)


@pytest.mark.parametrize("field, value", [("bos_id", 512), ("eos_id", 600), ("eos_id", 0),
                                          ("bos_id", -2)])
def test_coca_config_ids_outside_the_tokenizer_are_refused(field, value):
  c = tiny_config("/unused", loss="coca")
  c.coca[field] = value
  with pytest.raises(ValueError, match=rf"config\.coca\.{field}={value}"):
    factory.coca_model(c, 512)


def test_coca_config_refuses_a_non_finite_length_penalty():
  c = tiny_config("/unused", loss="coca")
  c.coca.eval_length_penalty = math.nan
  with pytest.raises(ValueError, match=r"config\.coca\.eval_length_penalty"):
    config_lib.validate(c)


@pytest.mark.parametrize("key, value", [
    ("lr", 0.0), ("lr", -1e-3), ("lr", math.nan),
    ("grad_clip", -1.0),          # clip_by_global_norm(-1) flips the update's sign
    ("weight_decay", -0.1),
    ("b1", 1.0), ("b2", 1.0),     # Adam's bias correction divides by 1 - b ** t = 0
    ("end_lr_fraction", 1.5),
])
def test_optimizer_fields_out_of_range_name_the_field(key, value):
  c = tiny_config("/unused")
  c.optim[key] = value
  with pytest.raises(ValueError, match=rf"config\.optim\.{key}"):
    config_lib.validate(c)


@pytest.mark.parametrize("name", [" zs", "zs\n", "", "a b"])
def test_evals_names_must_be_plain(name):
  c = tiny_config("/unused")
  c.evals[name] = dict(type="zeroshot", every=0)
  with pytest.raises(ValueError, match=r"config\.evals: the name .* \(a metric prefix"):
    config_lib.validate(c)


def test_classnames_file_with_a_blank_line_inside_names_the_line(tmp_path):
  """A blank line between names would drop a class and give every later one the label
  before its own."""
  names = tmp_path / "classnames.txt"
  names.write_text("cat\ndog\n\nbird\n  \n")
  with pytest.raises(ValueError, match=rf"{names}: line 3 is blank"):
    wds_pipeline.read_class_names(str(names))
  names.write_text(" cat \ndog\nbird\n\n")   # surrounding spaces and trailing blank lines: fine
  assert wds_pipeline.read_class_names(str(names)) == ["cat", "dog", "bird"]


def test_wds_dataset_reads_class_names_through_the_check(tmp_path):
  (tmp_path / "0.tar").write_bytes(b"")
  (tmp_path / "classnames.txt").write_text("cat\n\ndog\n")
  c = tiny_config("/unused", **{"data.name": "wds", "data.shards": str(tmp_path / "0.tar"),
                                "data.eval_shards": str(tmp_path / "0.tar")})
  with pytest.raises(ValueError, match="classnames.txt: line 2 is blank"):
    wds_pipeline.WdsDataset(c.data)
