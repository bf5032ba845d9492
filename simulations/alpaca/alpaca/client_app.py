"""ClientApp: say which partition this node holds, store the emulator, train the adapters on the
node's private Alpaca shard; under DP, Flower's own fixedclipping_mod clips the reply."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fed_crash.federation import client

app = ClientApp()


@app.query()
def partition(msg: Message, context: Context) -> Message:
    return client.answer_partition(msg, context)


@app.train("emulator")
def emulator(msg: Message, context: Context) -> Message:
    return client.receive_emulator(msg, context)


@app.train(mods=[client.dp_clipping_mod])
def train(msg: Message, context: Context) -> Message:
    return client.train(msg, context)
