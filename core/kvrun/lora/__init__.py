"""LoRA adapters: requests name one (:class:`~kvrun.lora.request.LoRARequest`), the
engine loads it from PEFT's format (:mod:`kvrun.lora.adapter`) and keeps it in one of a
fixed number of device slots (:mod:`kvrun.lora.manager`), and the platform's batched
``add_lora`` op applies each token's adapter inside the model's projections.

Importing this package imports no torch: the request type is what users import.
"""
