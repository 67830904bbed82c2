"""Bridges to other frameworks; each module imports its framework, an optional dependency.

- :mod:`blockzoo.integrations.ultralytics`: ``register()`` makes every blockzoo block usable by
  name in an Ultralytics YOLO model YAML (``pip install 'blockzoo[yolo]'``).
- :mod:`blockzoo.integrations.timm`: ``attn_layer(name)`` for timm models that take
  ``attn_layer=``, and ``register_models()`` to create blockzoo models with
  ``timm.create_model`` (``pip install timm``).

Model surgery for any ``nn.Module`` (torchvision included) is :mod:`blockzoo.surgery`.
"""
