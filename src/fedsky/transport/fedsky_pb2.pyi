from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Frame(_message.Message):
    __slots__ = ("kind", "site", "round", "token", "data", "seq", "last", "message", "nonce", "crc32", "size", "offset")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[Frame.Kind]
        HELLO: _ClassVar[Frame.Kind]
        WELCOME: _ClassVar[Frame.Kind]
        TASK: _ClassVar[Frame.Kind]
        REPLY: _ClassVar[Frame.Kind]
        DONE: _ClassVar[Frame.Kind]
        ERROR: _ClassVar[Frame.Kind]
        REJECT: _ClassVar[Frame.Kind]
        RESUME: _ClassVar[Frame.Kind]
    KIND_UNSPECIFIED: Frame.Kind
    HELLO: Frame.Kind
    WELCOME: Frame.Kind
    TASK: Frame.Kind
    REPLY: Frame.Kind
    DONE: Frame.Kind
    ERROR: Frame.Kind
    REJECT: Frame.Kind
    RESUME: Frame.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    kind: Frame.Kind
    site: str
    round: int
    token: str
    data: bytes
    seq: int
    last: bool
    message: str
    nonce: int
    crc32: int
    size: int
    offset: int
    def __init__(self, kind: _Optional[_Union[Frame.Kind, str]] = ..., site: _Optional[str] = ..., round: _Optional[int] = ..., token: _Optional[str] = ..., data: _Optional[bytes] = ..., seq: _Optional[int] = ..., last: _Optional[bool] = ..., message: _Optional[str] = ..., nonce: _Optional[int] = ..., crc32: _Optional[int] = ..., size: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...
