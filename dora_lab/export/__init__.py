"""Adapters out: save and load (:mod:`.checkpoint`), merge (:mod:`.merge`), PEFT LoRA export
(:mod:`.peft`) and the export CLI (:mod:`.cli`, ``python -m dora_lab.export``)."""
