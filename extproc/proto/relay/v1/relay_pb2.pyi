from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SubscribeRequest(_message.Message):
    __slots__ = ("session", "after")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    session: str
    after: str
    def __init__(self, session: _Optional[str] = ..., after: _Optional[str] = ...) -> None: ...

class SubscribeResponse(_message.Message):
    __slots__ = ("event", "end")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    event: Event
    end: End
    def __init__(self, event: _Optional[_Union[Event, _Mapping]] = ..., end: _Optional[_Union[End, _Mapping]] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("id", "seq", "event", "data")
    ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    id: str
    seq: int
    event: str
    data: str
    def __init__(self, id: _Optional[str] = ..., seq: _Optional[int] = ..., event: _Optional[str] = ..., data: _Optional[str] = ...) -> None: ...

class End(_message.Message):
    __slots__ = ("state", "reason", "last_seq")
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    state: str
    reason: str
    last_seq: int
    def __init__(self, state: _Optional[str] = ..., reason: _Optional[str] = ..., last_seq: _Optional[int] = ...) -> None: ...
