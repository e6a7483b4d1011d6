// Preloaded into Portkey's gateway by the benchmark: its CLI listens on every address; this keeps it on loopback.
import net from "node:net";

const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if (typeof args[0] === "object" && args[0] !== null) args[0] = { ...args[0], host: "127.0.0.1" };
  else if (typeof args[0] === "number") args.splice(1, typeof args[1] === "string" ? 1 : 0, "127.0.0.1");
  return listen.apply(this, args);
};
