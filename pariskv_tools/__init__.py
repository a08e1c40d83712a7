"""Tools around sglang-pariskv: retrieval evaluation, real workloads, the CPU demo.

Nothing here is imported when SGLang serves with ParisKV (``sglang_pariskv`` is the runtime
package); these modules need the ``eval`` extra (``pip install "sglang-pariskv[eval]"``).

* :mod:`.eval`: retrieval quality of ParisKV against its peers (``python -m pariskv_tools.eval``).
* :mod:`.workloads`: SmolLM2 or ``--model``'s model, seeded long-context tasks, attention
  capture, server workloads.
* :mod:`.demo`: passkey with dense attention and with ParisKV (``sglang-pariskv-demo``).
* :mod:`.hf_attention`: ParisKV sparse decoding inside a transformers model.
* :mod:`.cli`: help formatting and the model options shared by the command lines.
"""
