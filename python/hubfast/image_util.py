"""Image modules of the TF1 Hub format: the input size and channels they expect
(``hub.get_expected_image_size``, ``hub.get_num_image_channels``) and the ``ImageModuleInfo``
message a ``module_fn`` attaches to state its default size. tensorflow_hub dropped these in
0.16 with ``hub.Module``; programs written for 0.15 still call them.
"""
from __future__ import annotations

from typing import Any, List, Optional

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from .module_spec import ModuleSpec, attach_message

__all__ = ["ImageModuleInfo", "attach_image_module_info", "get_expected_image_size",
           "get_num_image_channels"]

#: The key of the attached ImageModuleInfo, as tensorflow_hub's modules carry it.
IMAGE_MODULE_INFO_KEY = "image_module_info"


def _image_module_info_class() -> Any:
    """ImageModuleInfo{InputSize default_image_size = 1}, InputSize{int64 height = 1;
    int64 width = 2}: tensorflow_hub's message, same fields and wire format, built here in a
    pool of our own (no generated module to ship, no clash with tensorflow_hub's)."""
    f = descriptor_pb2.FileDescriptorProto(name="hubfast/image_module_info.proto",
                                           package="hubfast", syntax="proto3")
    info = f.message_type.add(name="ImageModuleInfo")
    size = info.nested_type.add(name="InputSize")
    int64, message, optional = (descriptor_pb2.FieldDescriptorProto.TYPE_INT64,
                                descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
                                descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    size.field.add(name="height", number=1, type=int64, label=optional)
    size.field.add(name="width", number=2, type=int64, label=optional)
    info.field.add(name="default_image_size", number=1, type=message, label=optional,
                   type_name=".hubfast.ImageModuleInfo.InputSize")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("hubfast.ImageModuleInfo"))


ImageModuleInfo = _image_module_info_class()


def attach_image_module_info(image_module_info: Any) -> None:
    """Attaches `image_module_info` to the module being defined (call it in ``module_fn``)."""
    attach_message(IMAGE_MODULE_INFO_KEY, image_module_info)


def _spec_and_tags(module_or_spec: Any) -> tuple:
    if isinstance(module_or_spec, ModuleSpec):
        return module_or_spec, None
    spec = getattr(module_or_spec, "_spec", None)  # a hubfast Module
    if not isinstance(spec, ModuleSpec):
        raise TypeError(f"expected a hubfast Module or ModuleSpec, got {module_or_spec!r}")
    return spec, module_or_spec._tags  # pylint: disable=protected-access


def _image_input_shape(module_or_spec: Any, signature: Optional[str],
                       input_name: Optional[str]) -> List[Optional[int]]:
    spec, tags = _spec_and_tags(module_or_spec)
    infos = spec.get_input_info_dict(signature, tags)
    if input_name is None:
        if len(infos) != 1:
            raise ValueError(f"signature {signature or 'default'!r} has inputs "
                             f"{sorted(infos)}: pass input_name=")
        input_name = next(iter(infos))
    if input_name not in infos:
        raise ValueError(f"signature {signature or 'default'!r} has no input {input_name!r}")
    shape = infos[input_name].get_shape()
    if shape.rank != 4:
        raise ValueError(f"input {input_name!r} is not a batch of images: its shape is {shape}, "
                         "not [batch, height, width, channels]")
    return shape.as_list()


def get_expected_image_size(module_or_spec: Any, signature: Optional[str] = None,
                            input_name: Optional[str] = None) -> List[int]:
    """[height, width] of the images the module expects: from its attached ImageModuleInfo,
    else from the static shape of its image input. ValueError if neither tells."""
    spec, tags = _spec_and_tags(module_or_spec)
    info = spec.get_attached_message(IMAGE_MODULE_INFO_KEY, ImageModuleInfo, tags=tags)
    if info is not None and info.HasField("default_image_size"):
        size = info.default_image_size
        if size.height and size.width:
            return [size.height, size.width]
    shape = _image_input_shape(module_or_spec, signature, input_name)
    height, width = shape[1], shape[2]
    if not height or not width:
        raise ValueError(f"the module accepts images of any size ({shape}) and attaches no "
                         "ImageModuleInfo: choose an image size yourself")
    return [height, width]


def get_num_image_channels(module_or_spec: Any, signature: Optional[str] = None,
                           input_name: Optional[str] = None) -> int:
    """The number of colour channels (the last dimension) of the module's image input."""
    channels = _image_input_shape(module_or_spec, signature, input_name)[3]
    if channels is None:
        raise ValueError("the module's image input does not fix its number of channels")
    return channels
