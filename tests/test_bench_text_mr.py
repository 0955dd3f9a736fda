"""experiments/bench/text_mr.py: collab_rl and the host loop play the same futures (tiny sizes)."""

import jax
import torch

from experiments.bench import text_mr


def test_both_sides_play_the_same_futures(tmp_path):
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # a tiny model: one thread is faster, and safe on a busy machine
  try:
    _play_both(tmp_path)
  finally:
    torch.set_num_threads(threads)


def _play_both(tmp_path):
  records = text_mr.make_records(2)
  folder = text_mr.make_folder(str(tmp_path), records, width=32, layers=1)
  reply, user, window, samples = 4, 3, 1, 2
  task, ours, scorer = text_mr.make_ours(folder, records, reply, user, window, samples)
  conv, counts = ours(records, jax.random.key(0))
  host = text_mr.HostLoop(folder, task, reply, user, window, samples)
  mine = text_mr.ours_work(task, records, conv, counts)
  for group in (1, samples, len(records) * samples):  # CollabLLM's loop and the batched ones
    futures = host.play(records, group)
    assert len(futures) == len(records) * samples
    theirs = text_mr.host_work(futures)
    assert mine["user_turns"] == theirs["user_turns"] == window + 1
    for work in (mine, theirs):  # the candidate reply and `window` more, each within budget
      assert 0 < work["policy_tokens"] <= reply * (window + 1)
      assert 0 < work["user_tokens"] <= user * (window + 1)
    assert len(host.score(futures, 5e-4)) == len(futures)
  assert scorer.score(conv, records)[0].shape == (len(records) * samples,)
