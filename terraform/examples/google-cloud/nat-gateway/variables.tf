variable "project_id" {
  type        = string
  description = "Google Cloud project to deploy into."
}

variable "region" {
  type        = string
  default     = "us-east1"
  description = "Region of the network, the NAT and the gateways."
}

variable "replicas" {
  type        = number
  default     = 3
  description = "Number of gateways (three or more for high availability)."
}

variable "machine_type" {
  type        = string
  default     = "n1-standard-1"
  description = "Machine type of the gateways."
}

variable "log_level" {
  type        = string
  default     = "info"
  description = "Gateway log level or directives."
}

variable "enable_flow_logs" {
  type        = bool
  default     = false
  description = "Track and log flows on the gateways."
}

variable "token" {
  type        = string
  sensitive   = true
  description = "Gateway token from the Firezone portal."
}

variable "additional_startup_commands" {
  type        = list(string)
  default     = []
  description = "Shell commands cloud-init runs after installing the gateway."
}

variable "subnet_cidr" {
  type        = string
  default     = "10.128.0.0/20"
  description = "IPv4 range of the gateways' subnet."
}

variable "artifact_url" {
  type        = string
  description = "https base URL serving firezone_gateway_py-<vsn>-py3-none-any.whl."
}

variable "artifact_sha256" {
  type        = string
  description = "sha256 of that wheel (sha256sum dist/*.whl)."
}

variable "vsn" {
  type        = string
  default     = "1.6.0"
  description = "Gateway version, the wheel's version."
}
