"""Multimodal inputs: images, video and audio.

The frontend's side (the server's media content parts):

- :mod:`kvrun.multimodal.fetch`: getting a medium's bytes from an ``http(s)``, ``data:``
  or ``file:`` URL, bounded in time and size, with the guard against server-side
  request forgery (:class:`MediaPolicy`).
- :mod:`kvrun.multimodal.media`: decoding those bytes (Pillow for images, PyAV for
  video frames and audio) into the items a model's processor takes, each with a
  content hash (:func:`content_hash`).
- :mod:`kvrun.multimodal.assets`: the on-disk cache of downloads (VLLM_ASSETS_CACHE).

The engine's side: :mod:`kvrun.multimodal.processing` (a prompt's media -> expanded
placeholders and encoder inputs), :mod:`kvrun.multimodal.inputs` (what a request
carries), :mod:`kvrun.multimodal.encoder_cache` (encoder outputs by content hash).

fetch, media and assets import no torch; Pillow and PyAV are imported when a medium
is decoded (the ``media`` extra).
"""
