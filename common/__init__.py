"""What the node and the coordinator share: the run spec, the message keys and the tensor codec.

Both `client_app/` (a node) and `server_app/` + `strategy/` (the coordinator) import this
package; it imports neither of them, so a node never loads coordinator code.
"""
