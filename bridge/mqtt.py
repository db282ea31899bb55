"""paho-mqtt driven by the asyncio event loop, with buffered socket reads and coalesced writes.

paho reads each packet with several small `recv` calls (one for the command byte, one per
byte of the remaining length, one for the body) and writes each PUBACK with its own `send`.
At thousands of messages a second those system calls, plus waking paho's own network thread
for every acknowledgement, cost more than everything else the bridge does. Here the socket
is read in large chunks that paho then consumes from memory, all packets queued during one
write event go out in a single `send`, and the event loop (not a second thread) drives paho,
so acknowledging a message never crosses threads.

The driver also gives back-pressure: `pause_reading()` stops reading the socket (TCP flow control
then stops the broker's writes, and the broker keeps the backlog in its queue for the session),
`resume_reading()` starts again. The bridge pauses once it holds its window of unacknowledged
messages.

A received MQTT 3.1.1 PUBLISH of QoS 0 or 1 is parsed here too (`_handle_publish`): paho builds
an `MQTTMessageInfo` with its own `threading.Condition` for every message it receives, which only
its publishing side uses, and decodes the topic again at every access; that was a quarter of
runbridge's profile at 5,000 msgs/s (BENCHMARKS.md, "Where the time goes"). MQTT 5, QoS 2 and
topic-filtered callbacks (`message_callback_add`) keep paho's own path.

The overrides touch paho's private `_sock_recv`/`_sock_send`/`_sock_close`/`_handle_publish`;
the version is pinned in requirements.txt and tests/test_pipeline.py exercises this path end to end.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MessageState

log = logging.getLogger(__name__)

READ_CHUNK = 256 * 1024


class ReceivedMessage(mqtt.MQTTMessage):
    """A received PUBLISH as paho's `MQTTMessage` has it (topic, payload, qos, mid, dup, retain),
    without the `MQTTMessageInfo` paho's constructor makes for it, its topic decoded once."""

    __slots__ = ("_text",)

    def __init__(self, topic: bytes, text: str, payload: bytes, header: int, mid: int) -> None:
        # Not MQTTMessage.__init__: that is what builds the MQTTMessageInfo.
        self._topic = topic
        self._text = text
        self.payload = payload
        self.qos = (header & 0x06) >> 1
        self.dup = bool(header & 0x08)
        self.retain = bool(header & 0x01)
        self.mid = mid
        self.timestamp = 0.0
        self.state = MessageState.MQTT_MS_INVALID
        self.properties = None

    @property
    def topic(self) -> str:
        return self._text

    @topic.setter
    def topic(self, value: bytes) -> None:
        self._topic, self._text = value, value.decode("utf-8")


class BufferedClient(mqtt.Client):
    """A paho client whose socket I/O is buffered (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rbuf = b""
        self._rpos = 0
        self._wbuf = bytearray()
        self._coalescing = False
        self._filtered_callbacks = False

    # -- receiving --

    def message_callback_add(self, sub: str, callback: Any) -> None:
        self._filtered_callbacks = True
        super().message_callback_add(sub, callback)

    def _handle_publish(self) -> mqtt.MQTTErrorCode:
        header = self._in_packet["command"]
        if self._protocol == mqtt.MQTTv5 or header & 0x06 == 0x04 or self._filtered_callbacks:
            return super()._handle_publish()  # MQTT 5 properties, QoS 2, callbacks per topic
        packet = self._in_packet["packet"]
        end = 2 + int.from_bytes(packet[:2], "big")
        topic = packet[2:end]
        try:
            text = topic.decode("utf-8")
        except UnicodeDecodeError:
            return super()._handle_publish()  # paho's handling of a malformed topic
        if not topic or len(topic) < end - 2:
            return mqtt.MQTTErrorCode.MQTT_ERR_PROTOCOL
        mid = 0
        if header & 0x06:
            mid = int.from_bytes(packet[end : end + 2], "big")
            end += 2
        message = ReceivedMessage(topic, text, packet[end:], header, mid)
        on_message = self.on_message
        if on_message is not None:
            with self._in_callback_mutex:
                try:
                    on_message(self, self._userdata, message)
                except Exception as exc:
                    self._easy_log(mqtt.MQTT_LOG_ERR, "Caught exception in on_message: %s", exc)
                    if not self.suppress_exceptions:
                        raise
        if message.qos == 1 and not self._manual_ack:
            return self._send_puback(mid)
        return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS

    # -- reading --

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._rpos >= len(self._rbuf):
            data = super()._sock_recv(READ_CHUNK)
            if not data:
                return data  # the peer closed the connection
            self._rbuf, self._rpos = data, 0
        start = self._rpos
        self._rpos = min(start + bufsize, len(self._rbuf))
        return self._rbuf[start : self._rpos]

    def has_buffered_input(self) -> bool:
        """Whether bytes already read from the socket await processing."""
        if self._rpos < len(self._rbuf):
            return True
        sock = self._sock
        # TLS may hold decrypted bytes the socket no longer signals as readable.
        return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0

    # -- writing --

    def _sock_send(self, buf: bytes) -> int:
        if self._coalescing:
            self._wbuf += buf
            return len(buf)
        return super()._sock_send(buf)

    def loop_write(self) -> mqtt.MQTTErrorCode:
        """Write everything queued in one system call (what the socket takes now; the rest later)."""
        self._coalescing = True
        try:
            rc = super().loop_write()
        finally:
            self._coalescing = False
        if self._wbuf and self._sock is not None:
            try:
                sent = super()._sock_send(bytes(self._wbuf))
                del self._wbuf[:sent]
            except BlockingIOError:
                pass
            except OSError as exc:
                log.warning("mqtt write failed: %s", exc)
                self._wbuf.clear()
                return mqtt.MQTTErrorCode.MQTT_ERR_CONN_LOST
            if self._wbuf:
                self._call_socket_register_write()
        return rc

    def want_write(self) -> bool:
        return bool(self._wbuf) or super().want_write()

    def _sock_close(self) -> None:
        # paho closes right after queueing DISCONNECT: send what is buffered (acknowledgements
        # included) first, best effort, so the broker does not redeliver acknowledged messages.
        if self._wbuf and self._sock is not None:
            try:
                super()._sock_send(bytes(self._wbuf))
            except OSError:
                pass
        self._rbuf, self._rpos = b"", 0
        self._wbuf.clear()
        super()._sock_close()


class AsyncioDriver:
    """Runs a paho client's network I/O on an asyncio loop and reconnects with backoff."""

    def __init__(
        self, client: BufferedClient, connect: Callable[[], None], *, min_delay: float = 1, max_delay: float = 30
    ) -> None:
        self.client = client
        self._connect = connect
        self.min_delay = min_delay
        self.max_delay = max_delay
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # Back-pressure: while paused the socket is not read, so the broker keeps what we have not
        # taken (TCP flow control stops its writes) instead of this process buffering it.
        self._paused = False
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write

    def start(self) -> None:
        """Connect (retrying in the background until it works) and keep the connection alive."""
        self._task = self._loop.create_task(self._maintain())

    async def stop(self) -> None:
        """Flush, disconnect and stop reconnecting."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
        if self.client.is_connected():
            self.client.disconnect()
            self.client.loop_write()

    def pause_reading(self) -> None:
        """Stop reading the socket (what is already read is still processed)."""
        if self._paused:
            return
        self._paused = True
        sock = self.client.socket()
        if sock is not None:
            self._loop.remove_reader(sock)

    def resume_reading(self) -> None:
        """Read the socket again."""
        if not self._paused:
            return
        self._paused = False
        sock = self.client.socket()
        if sock is not None:
            self._loop.add_reader(sock, self._on_readable)
            # Bytes read (or decrypted by TLS) before the pause do not make the socket readable.
            self._loop.call_soon(self._on_readable)

    @property
    def paused(self) -> bool:
        return self._paused

    # -- socket callbacks (from paho, on the loop's thread) --

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if not self._paused:
            self._loop.add_reader(sock, self._on_readable)

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._loop.remove_reader(sock)
        self._loop.remove_writer(sock)

    def _on_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._loop.add_writer(sock, self.client.loop_write)

    def _on_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._loop.remove_writer(sock)

    def _on_readable(self) -> None:
        if self.client.socket() is None:
            return
        # One readable event can carry hundreds of packets: process all that were read. paho reads
        # the socket again whenever the buffer runs dry, so a pause must end the loop itself.
        while not self._paused and self.client.loop_read() == mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS:
            if not self.client.has_buffered_input():
                break

    # -- connection upkeep --

    async def _maintain(self) -> None:
        delay = self.min_delay
        while not self._stopping:
            if not self.client.is_connected() and self.client.socket() is None:
                try:
                    self._connect()
                    delay = self.min_delay
                except OSError as exc:
                    log.warning("mqtt connect failed: %s (retrying in %.0f s)", exc, delay)
                    await asyncio.sleep(delay * (0.5 + random.random() / 2))  # noqa: S311 - jitter
                    delay = min(delay * 2, self.max_delay)
                    continue
            if self._paused:
                # The broker's PINGRESP waits behind the backlog we are not reading: keep sending
                # PINGREQs (the broker drops a silent client) without paho taking the unread
                # answer for a dead connection.
                self.client._ping_t = 0
            rc = self.client.loop_misc()
            if rc != mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS and self.client.socket() is not None:
                # Keepalive missed: drop the socket; the next round reconnects.
                self.client._sock_close()
            await asyncio.sleep(1)
