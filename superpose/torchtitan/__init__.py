"""Token Superposition Training on torchtitan's own trainer and models: a plugin, no fork.

    torchrun --nproc-per-node 8 -m superpose.torchtitan.train --module superpose.torchtitan --config llama3_270m_tst

``--module superpose.torchtitan`` makes torchtitan import ``superpose.torchtitan.config_registry``,
whose functions return a ``TSTTrainer.Config``. The pieces (docs/torchtitan.md):

- ``embedding.BagEmbedding``: torchtitan's ``Embedding`` that averages a bag of ids ``[B, L, s]``
  in fp32 (``superpose.method.embed_bags``); ids ``[B, L]`` are looked up as before.
- ``loss.MultiHotLoss``: superpose's multi-hot loss as a torchtitan ``BaseLoss`` (also inside
  torchtitan's ``ChunkedLossWrapper``); next-token labels go to torchtitan's own cross-entropy.
- ``data.TokenWindowDataLoader``: the windows of a ``superpose prepare`` directory, the same
  windows superpose's own trainer reads (by seed and step), so runs resume exactly.
- ``trainer.TSTTrainer``: torchtitan's ``Trainer`` that runs the stages of a superpose ``[tst]``
  table (``superpose.schedule``) with one LR schedule and one optimizer state across the switch.
- ``train``: torchtitan's entry point with the shims a released torch needs (torchtitan 0.3.0 is
  written against a PyTorch nightly); ``-m torchtitan.train`` on a nightly that needs none.
- ``validation.HeldOutValidator`` and ``records``: superpose's held-out windows scored by torchtitan's
  ``Validator``, and superpose's run records, so ``superpose report`` reads the run.
- ``export``: a torchtitan checkpoint to a Hugging Face model directory (torchtitan's state-dict
  adapter) that ``superpose eval`` and ``superpose generate`` read.

Needs ``pip install 'superpose[torchtitan]'``; ``import superpose`` never imports torchtitan.
"""
